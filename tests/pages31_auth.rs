//! `sturdy-auth` and `sturdy-version` under an agent tool: OAuth2 client credentials against the
//! npm oauth2-mock-server peer (and its odd token endpoint), composed with `Paginate` over
//! json-server, the `ClientBuilder` stack (retry, circuit breaker) and tower's `Buffer`,
//! `ConcurrencyLimit(1)` and `Timeout`, driven by a kept service and from many tasks. Peers come
//! from `scripts/interop.sh` (`STURDY_INTEROP_KEEP=1` prints the variables); without them these
//! tests skip.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use sturdy::auth::{AuthLayer, ClientCredentials, ExposeSecret};
use sturdy::core::{Delivery, ErrorKind};
use sturdy::paginate::{LinkHeader, Paginate};
use sturdy::version::{Notice, VersionLayer};
use sturdy::ClientBuilder;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::pages31_util::*;

const SECRET: &str = "interop-secret";

fn unique(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::process::id();
    format!(
        "{prefix}pages31-{}-{nanos}",
        N.fetch_add(1, Ordering::SeqCst)
    )
}

async fn get_json(url: &str) -> Value {
    use http_body_util::BodyExt;
    let res = http()
        .request(Request::get(url).body(Full::default()).unwrap())
        .await
        .unwrap();
    let b = res.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&b).unwrap()
}

fn get(url: &str) -> Request<Full<Bytes>> {
    Request::get(url).body(Full::default()).unwrap()
}

/// A whole agent stack over real peers: OAuth2 client credentials from oauth2-mock-server, a
/// version pin in a header, the default `ClientBuilder` layers, and `Paginate` over json-server's
/// Link pagination, walked by 8 tasks at once and by `page()` cursors: every item once per walk,
/// every page request carries the token and the version, and one token request serves all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages31_paginated_walks_through_oauth_and_version_over_real_peers() {
    let (Some(oauth), Some(json_server), Some(stats)) = (
        peer("STURDY_INTEROP_OAUTH_URL"),
        peer("STURDY_INTEROP_JSON_SERVER_URL"),
        peer("STURDY_INTEROP_STATS_URL"),
    ) else {
        return;
    };
    let id = unique("walk-");
    let fetched = Arc::new(AtomicUsize::new(0));
    let f = fetched.clone();
    let tokens = ClientCredentials::new(http(), &format!("{oauth}/token"), id.clone(), SECRET)
        .unwrap()
        .on_event(move |e| {
            if format!("{e:?}").contains("TokenFetched") {
                f.fetch_add(1, Ordering::SeqCst);
            }
        });
    let seen = Arc::new(Mutex::new(Vec::<(Option<String>, Option<String>)>::new()));
    let s = seen.clone();
    let wire = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let s = s.clone();
        async move {
            let h = |n: &str| {
                req.headers()
                    .get(n)
                    .map(|v| v.to_str().unwrap_or("").to_owned())
            };
            s.lock()
                .unwrap()
                .push((h("authorization"), h("x-api-version")));
            http().request(req).await
        }
    });
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens.clone()))
        .with_version(VersionLayer::header("x-api-version", "2024-06-01").unwrap())
        .build(wire);
    let pager = Paginate::builder(
        client,
        &format!("{json_server}/items?_page=1"),
        LinkHeader::new("").with_limit_param("_limit"),
    )
    .with_page_size(15)
    .with_page_timeout(Duration::from_secs(10))
    .build()
    .unwrap();
    let mut walks = Vec::new();
    for _ in 0..8 {
        let pager = pager.clone();
        walks.push(tokio::spawn(async move {
            pager.items().try_collect::<Vec<Value>>().await
        }));
    }
    for w in walks {
        let items = within(Duration::from_secs(60), "walk", w)
            .await
            .unwrap()
            .unwrap();
        let ids: Vec<u64> = items.iter().map(|v| v["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, (1..=100).collect::<Vec<_>>());
    }
    // And with page() cursors, 13 at a time.
    let mut cursor: Option<String> = None;
    let mut got = Vec::new();
    loop {
        let p = pager.page(cursor.as_deref(), 13).await.unwrap();
        got.extend(p.items.iter().map(|v| v["id"].as_u64().unwrap()));
        if !p.has_more {
            break;
        }
        cursor = p.next_cursor;
    }
    assert_eq!(got, (1..=100).collect::<Vec<_>>());
    let token = tokens.get().await.unwrap();
    let bearer = format!("Bearer {}", token.secret().expose_secret());
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 8 * 7);
    for (auth, version) in &seen {
        assert_eq!(auth.as_deref(), Some(bearer.as_str()));
        assert_eq!(version.as_deref(), Some("2024-06-01"));
    }
    assert_eq!(
        fetched.load(Ordering::SeqCst),
        1,
        "one token for every page"
    );
    let st = get_json(&format!("{stats}/stats?client={id}")).await;
    assert_eq!(st["tokens"], 1, "{st}");
}

/// "A call that waits for a token holds that ready service ... Past [the token timeout] the call
/// fails with ... kind `Timeout` ... 'the request was not sent' ... The token request goes on,
/// and later callers share it": a slow token endpoint (400 ms) behind `Buffer` over
/// `ConcurrencyLimit(1)` over `Timeout`, a kept service and 12 tasks; every early caller fails
/// `NotSent` naming the token endpoint, the single token request completes, and every later
/// call uses its token without another token request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages31_slow_token_endpoint_under_buffer_limit_and_timeout() {
    let (Some(odd), Some(api), Some(stats)) = (
        peer("STURDY_INTEROP_ODD_TOKEN_URL"),
        peer("STURDY_INTEROP_API_URL"),
        peer("STURDY_INTEROP_STATS_URL"),
    ) else {
        return;
    };
    let id = unique("slow400-");
    let tokens = ClientCredentials::new(http(), &format!("{odd}/token"), id.clone(), SECRET)
        .unwrap()
        .with_request_timeout(Duration::from_secs(5));
    let svc = ServiceBuilder::new()
        .buffer(32)
        .layer(AuthLayer::oauth2(tokens).with_token_timeout(Duration::from_millis(100)))
        .concurrency_limit(1)
        .timeout(Duration::from_secs(5))
        .service(http());
    let mut tasks = Vec::new();
    for _ in 0..12 {
        let mut svc = svc.clone();
        let url = format!("{api}/whoami");
        tasks.push(tokio::spawn(async move {
            let ready = svc.ready().await.map_err(|e| e.to_string())?;
            ready.call(get(&url)).await.map_err(|e| {
                let c = core_err(&*e).map(|c| {
                    (
                        c.kind().clone(),
                        sturdy::core::classify::delivery(&*e),
                        c.to_string(),
                    )
                });
                format!("{c:?} | {}", chain(&*e))
            })
        }));
    }
    let mut timeouts = 0;
    for t in tasks {
        match within(Duration::from_secs(20), "caller", t).await.unwrap() {
            Ok(res) => assert_eq!(res.status(), StatusCode::OK),
            Err(e) => {
                assert!(e.contains("Timeout") && e.contains("NotSent"), "{e}");
                assert!(e.contains(&format!("{odd}/token")), "{e}");
                assert!(e.contains("not sent"), "{e}");
                timeouts += 1;
            }
        }
    }
    assert!(
        timeouts >= 1,
        "no caller waited past 100 ms for a 400 ms token"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut kept = svc.clone();
    for _ in 0..5 {
        let res = kept
            .ready()
            .await
            .unwrap()
            .call(get(&format!("{api}/whoami")))
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    let count = get_json(&format!("{odd}/count?client={id}")).await;
    assert_eq!(count["requests"], 1, "{count}");
    let st = get_json(&format!("{stats}/stats?client={id}")).await;
    // The API saw exactly the calls that did not time out, and the five later ones.
    assert_eq!(st["api_calls"], 12 - timeouts + 5, "{st}");
}

/// "a caller that gives up does not cancel it for the others": callers aborted at every stage
/// of a slow token request (before it is sent, while it is in flight) leave one token request,
/// which the next caller uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages31_cancelled_token_waits_leave_one_request() {
    let (Some(odd), Some(api)) = (
        peer("STURDY_INTEROP_ODD_TOKEN_URL"),
        peer("STURDY_INTEROP_API_URL"),
    ) else {
        return;
    };
    let id = unique("slow300-");
    let tokens =
        ClientCredentials::new(http(), &format!("{odd}/token"), id.clone(), SECRET).unwrap();
    let svc = AuthLayer::oauth2(tokens).layer(http());
    for delay_ms in [0u64, 1, 5, 50, 150] {
        let s = svc.clone();
        let url = format!("{api}/whoami");
        let task = tokio::spawn(async move { s.oneshot(get(&url)).await });
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        task.abort();
        let _ = task.await;
    }
    let res = within(
        Duration::from_secs(10),
        "after",
        svc.clone().oneshot(get(&format!("{api}/whoami"))),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let count = get_json(&format!("{odd}/count?client={id}")).await;
    assert!(
        count["requests"].as_u64().unwrap() <= 1,
        "aborted callers cost extra token requests: {count}"
    );
}

/// A token endpoint answering 503 under a `ClientBuilder` stack with a circuit breaker that
/// opens after 2 consecutive failures: "a circuit breaker around the auth layer does not count a
/// failing token endpoint against the API host", and every error is retryable `Server(503)`,
/// `NotSent`, says it was the token endpoint's, and the API never saw a request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages31_failing_token_endpoint_is_not_the_apis_failure() {
    let (Some(odd), Some(stats)) = (
        peer("STURDY_INTEROP_ODD_TOKEN_URL"),
        peer("STURDY_INTEROP_STATS_URL"),
    ) else {
        return;
    };
    let api = serve(|_, _| async move { status(200) }).await;
    let id = unique("down-");
    let tokens =
        ClientCredentials::new(http(), &format!("{odd}/token"), id.clone(), SECRET).unwrap();
    let (breaker, handle) = sturdy::circuit::CircuitBreakerLayer::new()
        .with_consecutive_failures(2)
        .pair();
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens))
        .with_circuit_breaker(breaker)
        .without_retry()
        .build(http());
    for _ in 0..6 {
        let err = within(
            Duration::from_secs(10),
            "call",
            client.clone().oneshot(get(&api.url("/x"))),
        )
        .await
        .unwrap_err();
        let c = core_err(&*err).unwrap_or_else(|| panic!("{}", chain(&*err)));
        assert_eq!(
            c.kind(),
            &ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE),
            "{}",
            chain(&*err)
        );
        assert!(c.is_retryable());
        assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
        assert!(c.to_string().contains("token endpoint"), "{c}");
    }
    let states = format!("{:?}", handle.states());
    assert!(!states.contains("Open"), "{states}");
    assert_eq!(api.seen.count(), 0);
    let _ = stats;
}

/// "no `Debug` or log line shows them": a whole stack at TRACE level (retry, breaker, auth with
/// a 401 replay, version, pagination) against the real peers, an echoing token endpoint, and a
/// rejected token; neither the client secret nor an access token appears in any log line, error
/// or `Debug` output.
#[tokio::test(flavor = "current_thread")]
async fn pages31_no_secret_in_logs_errors_or_debug() {
    let (Some(oauth), Some(odd), Some(api)) = (
        peer("STURDY_INTEROP_OAUTH_URL"),
        peer("STURDY_INTEROP_ODD_TOKEN_URL"),
        peer("STURDY_INTEROP_API_URL"),
    ) else {
        return;
    };
    let logs = Logs::default();
    let _guard = crate::logs13_common::set_default(logs.subscriber());
    let id = unique("rev-");
    let tokens = ClientCredentials::new(http(), &format!("{oauth}/token"), id.clone(), SECRET)
        .unwrap()
        .with_scopes(["orders:read"]);
    let layer = AuthLayer::oauth2(tokens.clone());
    let client = ClientBuilder::new()
        .with_auth(layer.clone())
        .with_version(VersionLayer::query("api-version", "2024-06-01"))
        .build(http());
    // The first token is revoked at the API: a 401, a refresh, a replay.
    let res = client
        .clone()
        .oneshot(get(&format!("{api}/revoke-first-token")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    let second = tokens.get().await.unwrap();
    let res = client
        .clone()
        .oneshot(get(&format!("{api}/always-401")))
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    let third = tokens.get().await.unwrap();
    // An echoing token endpoint, with the secret posted in the form.
    let echo = ClientCredentials::new(
        http(),
        &format!("{odd}/token"),
        unique("echo10-"),
        "pages31-very-secret",
    )
    .unwrap()
    .with_client_auth(sturdy::auth::ClientAuth::SecretPost);
    let echo_client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(echo.clone()))
        .build(http());
    let err = echo_client
        .clone()
        .oneshot(get(&format!("{api}/whoami")))
        .await
        .unwrap_err();
    let mut shown = format!(
        "{}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        chain(&*err),
        err,
        tokens,
        layer,
        echo,
        second,
        echo_client
    );
    shown.push_str(&logs.text());
    for secret in [
        SECRET,
        "pages31-very-secret",
        "pages31-very-secret".replace('-', "%2D").as_str(),
        second.secret().expose_secret(),
        third.secret().expose_secret(),
    ] {
        assert!(!shown.contains(secret), "{secret} shown in:\n{shown}");
    }
    // The JWT's signature part alone is a secret too.
    let sig = second
        .secret()
        .expose_secret()
        .rsplit('.')
        .next()
        .unwrap()
        .to_owned();
    assert!(!shown.contains(&sig));
    assert!(
        logs.text().len() > 100,
        "nothing was logged: {}",
        logs.text()
    );
}

/// What is shared between tasks is `Send + Sync + Clone`.
#[test]
fn pages31_auth_and_version_types_are_send_sync_clone() {
    fn ssc<T: Send + Sync + Clone + 'static>() {}
    ssc::<AuthLayer>();
    ssc::<ClientCredentials>();
    ssc::<VersionLayer>();
    ssc::<sturdy::auth::Auth<sturdy::version::Version<Http>>>();
    ssc::<sturdy::version::Version<sturdy::auth::Auth<Http>>>();
    ssc::<Notice>();
}

/// "reported once per endpoint": 64 concurrent calls to one deprecated endpoint through `Buffer`,
/// from many tasks on two threads, report it exactly once; the notice carries the RFC 9745 date
/// and the Sunset; the response keeps its headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages31_concurrent_deprecated_calls_report_once() {
    let server = serve(|_, _| async move {
        Response::builder()
            .status(200)
            .header("deprecation", "@1688169599")
            .header("sunset", "Sun, 30 Jun 2030 23:59:59 GMT")
            .body(full("{}"))
            .unwrap()
    })
    .await;
    let notices = Arc::new(Mutex::new(Vec::<Notice>::new()));
    let n = notices.clone();
    let svc = ServiceBuilder::new()
        .buffer(64)
        .layer(
            VersionLayer::header("api-version", "2024-06-01")
                .unwrap()
                .on_notice(move |x| n.lock().unwrap().push(x.clone())),
        )
        .service(http());
    let gate = Arc::new(tokio::sync::Barrier::new(64));
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut svc = svc.clone();
        let url = server.url(&format!("/v1/orders?page={i}"));
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            let res = svc.ready().await.unwrap().call(get(&url)).await.unwrap();
            assert_eq!(res.headers()["deprecation"], "@1688169599");
            assert!(res.headers().contains_key("sunset"));
        }));
    }
    for t in tasks {
        within(Duration::from_secs(20), "call", t).await.unwrap();
    }
    let notices = notices.lock().unwrap().clone();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].endpoint, "GET /v1/orders");
    assert_eq!(
        notices[0].deprecation,
        Some(Some(
            std::time::UNIX_EPOCH + Duration::from_secs(1688169599)
        ))
    );
    assert_eq!(
        notices[0].sunset,
        Some(std::time::UNIX_EPOCH + Duration::from_secs(1_909_094_399))
    );
    for h in server.seen.headers() {
        assert_eq!(h.get_all("api-version").iter().count(), 1);
        assert_eq!(h["api-version"], "2024-06-01");
    }
}

/// "An endpoint is the method and the path": an API key in the query (`api_key_query`) never
/// reaches the notice or the warning, and a paginated walk of one path is one endpoint.
/// "a version the caller set is kept": in query mode, a next link that already carries the
/// version is not given a second one, and a page the pager asks for with its own version keeps
/// it.
#[tokio::test(flavor = "current_thread")]
async fn pages31_version_under_pagination_and_query_keys() {
    let logs = Logs::default();
    let _guard = crate::logs13_common::set_default(logs.subscriber());
    let server = serve(|req, _| async move {
        let page: usize = param(&req, "page")
            .and_then(|p| p.parse().ok())
            .unwrap_or(1);
        let mut headers = vec![("deprecation", "true".to_owned())];
        if page < 4 {
            // The server echoes the version into its next links, as many do.
            headers.push((
                "link",
                format!(
                    "</items?page={}&api-version=2024-06-01>; rel=\"next\"",
                    page + 1
                ),
            ));
        }
        json_response(json!([{"id": page}]), &headers)
    })
    .await;
    let notices = Arc::new(Mutex::new(Vec::<Notice>::new()));
    let n = notices.clone();
    let stack = ServiceBuilder::new()
        .layer(AuthLayer::api_key_query("api_key", "pages31-query-key").unwrap())
        .layer(
            VersionLayer::query("api-version", "2024-06-01")
                .on_notice(move |x| n.lock().unwrap().push(x.clone())),
        )
        .service(http());
    let pager = Paginate::builder(stack, &server.url("/items"), LinkHeader::new(""))
        .build()
        .unwrap();
    let items: Vec<Value> = pager.items().try_collect().await.unwrap();
    assert_eq!(items.len(), 4);
    let notices = notices.lock().unwrap().clone();
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert_eq!(notices[0].endpoint, "GET /items");
    assert_eq!(notices[0].deprecation, Some(None));
    let hits = server.seen.hits();
    assert_eq!(hits.len(), 4);
    for h in &hits {
        assert_eq!(
            h.matches("api-version=").count(),
            1,
            "the version twice (or not at all) in {h}"
        );
        assert_eq!(h.matches("api_key=").count(), 1, "{h}");
    }
    let text = format!("{}{notices:?}", logs.text());
    assert!(!text.contains("pages31-query-key"), "{text}");
    assert!(
        text.contains("/items"),
        "no deprecation warning logged: {text}"
    );
}

/// The token endpoint failing while a valid token is cached: "a failed refresh keeps a
/// still-valid token", the caller goes on without waiting, against the real peer with 2 s
/// tokens whose refresh (at half their life) the odd endpoint makes slow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages31_refresh_in_background_never_blocks_callers() {
    let (Some(oauth), Some(api)) = (
        peer("STURDY_INTEROP_OAUTH_URL"),
        peer("STURDY_INTEROP_API_URL"),
    ) else {
        return;
    };
    let id = unique("ttl4-");
    let tokens =
        ClientCredentials::new(http(), &format!("{oauth}/token"), id.clone(), SECRET).unwrap();
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(tokens.clone()).with_token_timeout(Duration::ZERO))
        .concurrency_limit(1)
        .service(http());
    // The first token: waited for with a nonzero timeout.
    let first = tokens.get().await.unwrap();
    let mut kept = svc.clone();
    let started = tokio::time::Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_millis(3000) {
        // With `Duration::ZERO`: "the cached token or fail at once" — a token due for refresh
        // is still cached and valid, so no call fails.
        let res = kept
            .ready()
            .await
            .unwrap()
            .call(get(&format!("{api}/whoami")))
            .await
            .unwrap_or_else(|e| panic!("call {calls} failed: {}", chain(&*e)));
        assert_eq!(res.status(), StatusCode::OK);
        calls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let now = tokens.get().await.unwrap();
    assert!(!now.same_value(&first), "the token was never refreshed");
}
