//! The composed client's `tracing` events, errors and `Debug` for URIs that carry a password in
//! their userinfo and API keys in their query: "no secret in any log, error message or `Debug`
//! output". Every event of every level is captured, fields formatted.
#![cfg(feature = "full")]

use crate::logs13_common;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use logs13_common::{clean, closed_port, whole, Capture};
use sturdy::retry::{Backoff, RetryLayer};
use tower::ServiceExt;

const PW: &str = "PwUser13xq";
const KEY: &str = "ApiKey13zz";
const TOK: &str = "QueryTok13yy";
const ALL: [&str; 3] = [PW, KEY, TOK];

fn quick() -> RetryLayer {
    RetryLayer::new().with_backoff(
        Backoff::decorrelated_jitter(Duration::from_millis(1), Duration::from_millis(2)).unwrap(),
    )
}

fn uri(port: u16, path: &str) -> String {
    format!("http://user:{PW}@127.0.0.1:{port}{path}?api_key={KEY}&token={TOK}")
}

fn get(port: u16, path: &str) -> Request<Full<Bytes>> {
    Request::get(uri(port, path))
        .body(Full::<Bytes>::default())
        .unwrap()
}

fn hyper_client() -> hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
> {
    hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>()
}

async fn server() -> u16 {
    use axum::routing::get;
    let app = axum::Router::new()
        .route(
            "/down",
            get(|| async { (StatusCode::SERVICE_UNAVAILABLE, "down") }),
        )
        .route(
            "/later",
            get(|| async {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "3600")],
                    "later",
                )
            }),
        )
        .route(
            "/soon",
            get(|| async {
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "0")],
                    "soon",
                )
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(150)).await;
                "slow"
            }),
        )
        .route("/ok", get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

/// Retries after 503 and 429 (`Retry-After: 0` and a refused `Retry-After: 3600`), a refused
/// connection, attempt timeouts, an open circuit, a rate limit and an adaptive concurrency
/// limit that refuse calls, and coalesced calls: no event, error or `Debug` shows a secret.
#[tokio::test(flavor = "current_thread")]
async fn the_stacks_events_and_errors_hold_no_uri_secret() {
    let capture = Capture::default();
    let _guard = capture.install();
    let port = server().await;
    let mut shown = Vec::new();

    // Retries, Retry-After, refused connection.
    let client = sturdy::ClientBuilder::new()
        .with_retry(quick())
        .with_circuit_breaker(sturdy::circuit::CircuitBreakerLayer::new().with_max_breakers(64))
        .build(hyper_client());
    for path in ["/down", "/soon", "/later", "/ok"] {
        match client.clone().oneshot(get(port, path)).await {
            Ok(res) => shown.push(format!("{path}: {res:?}")),
            Err(e) => shown.push(format!("{path}: {}", whole(&*e))),
        }
    }
    let closed = closed_port();
    let e = client.clone().oneshot(get(closed, "/x")).await.unwrap_err();
    shown.push(format!("refused: {}", whole(&*e)));
    let post = Request::post(uri(closed, "/orders"))
        .header("authorization", format!("Bearer {KEY}"))
        .body(Full::new(Bytes::from_static(b"{}")))
        .unwrap();
    let e = client.clone().oneshot(post).await.unwrap_err();
    shown.push(format!("refused POST: {}", whole(&*e)));

    // Attempt timeouts.
    let client = sturdy::ClientBuilder::new()
        .with_retry(quick())
        .with_attempt_timeout(Duration::from_millis(20))
        .build(hyper_client());
    let e = client
        .clone()
        .oneshot(get(port, "/slow"))
        .await
        .unwrap_err();
    shown.push(format!("timeout: {}", whole(&*e)));

    // The circuit opens on 503s, then refuses.
    let client = sturdy::ClientBuilder::new()
        .with_retry(quick())
        .with_circuit_breaker(
            sturdy::circuit::CircuitBreakerLayer::new()
                .with_consecutive_failures(2)
                .with_open_duration(Duration::from_secs(30), Duration::from_secs(30)),
        )
        .build(hyper_client());
    let mut open = false;
    for _ in 0..10 {
        match client.clone().oneshot(get(port, "/down")).await {
            Ok(res) => shown.push(format!("circuit: {res:?}")),
            Err(e) => {
                open = true;
                shown.push(format!("circuit: {}", whole(&*e)));
            }
        }
    }
    assert!(open, "the circuit opened");

    // A rate limit that refuses a call rather than wait.
    // No retries here: the retry layer would wait out the refusal's suggested wait.
    let client = sturdy::ClientBuilder::new()
        .without_retry()
        .with_rate_limit(
            sturdy::ratelimit::RateLimitLayer::new(
                sturdy::ratelimit::Quota::per_second(1).unwrap(),
            )
            .with_max_wait(Duration::from_millis(1)),
        )
        .build(hyper_client());
    let mut limited = false;
    for _ in 0..3 {
        match client.clone().oneshot(get(port, "/ok")).await {
            Ok(_) => {}
            Err(e) => {
                limited = true;
                shown.push(format!("rate limit: {}", whole(&*e)));
            }
        }
    }
    assert!(limited, "the rate limit refused a call");
    // The server's 429 pauses every call to the host.
    let client = sturdy::ClientBuilder::new()
        .without_retry()
        .with_rate_limit(
            sturdy::ratelimit::RateLimitLayer::adaptive_only()
                .with_max_wait(Duration::from_millis(1)),
        )
        .build(hyper_client());
    let _ = client.clone().oneshot(get(port, "/later")).await;
    if let Err(e) = client.clone().oneshot(get(port, "/ok")).await {
        shown.push(format!("paused: {}", whole(&*e)));
    }

    // An adaptive concurrency limit of one, full.
    let client = sturdy::ClientBuilder::new()
        .with_retry(quick())
        .with_adaptive_concurrency(
            sturdy::concurrency::AdaptiveConcurrencyLayer::new()
                .with_limits(1, 1)
                .with_initial_limit(1)
                .with_max_wait(Duration::from_millis(5)),
        )
        .build(hyper_client());
    let calls = (0..4).map(|i| {
        let c = client.clone();
        let path = format!("/slow?n={i}&api_key={KEY}");
        let req = Request::get(format!("http://user:{PW}@127.0.0.1:{port}{path}"))
            .body(Full::<Bytes>::default())
            .unwrap();
        async move { c.oneshot(req).await }
    });
    for r in futures_util::future::join_all(calls).await {
        if let Err(e) = r {
            shown.push(format!("concurrency: {}", whole(&*e)));
        }
    }

    // Coalesced calls.
    let (layer, handle) = sturdy::coalesce::CoalesceLayer::new().pair();
    let client = sturdy::ClientBuilder::new()
        .with_retry(quick())
        .with_coalesce(layer)
        .build(hyper_client());
    let calls = (0..3).map(|_| client.clone().oneshot(get(port, "/slow")));
    for r in futures_util::future::join_all(calls).await {
        match r {
            Ok(res) => shown.push(format!("coalesce: {res:?}")),
            Err(e) => shown.push(format!("coalesce: {}", whole(&*e))),
        }
    }
    let calls = (0..3).map(|_| client.clone().oneshot(get(closed, "/x")));
    for r in futures_util::future::join_all(calls).await {
        if let Err(e) = r {
            shown.push(format!("coalesce refused: {}", whole(&*e)));
        }
    }
    shown.push(format!("{handle:?} {client:?}"));

    let logs = capture.text();
    if std::env::var_os("LOGS13_SHOW").is_some() {
        eprintln!("{logs}\n{}", shown.join("\n"));
    }
    assert!(logs.contains("retrying"), "events were captured: {logs}");
    clean("logs", &logs, &ALL);
    for s in &shown {
        clean("errors", s, &ALL);
    }
}

/// A hedged GET: the second copy is announced at DEBUG with the request's URI.
#[tokio::test(flavor = "current_thread")]
async fn hedging_logs_no_uri_secret() {
    let capture = Capture::default();
    let _guard = capture.install();
    let port = server().await;
    let (layer, handle) = sturdy::hedge::HedgeLayer::new()
        .with_min_samples(1)
        .with_budget(1.0, 100)
        .unwrap()
        .with_delay_bounds(Duration::from_millis(5), Duration::from_millis(5))
        .pair();
    let client = sturdy::ClientBuilder::new()
        .with_retry(quick())
        .with_hedge(layer)
        .build(hyper_client());
    client.clone().oneshot(get(port, "/ok")).await.unwrap();
    for _ in 0..3 {
        client.clone().oneshot(get(port, "/slow")).await.unwrap();
    }
    let stats = handle.stats("127.0.0.1");
    let logs = capture.text();
    assert!(
        logs.contains("hedging"),
        "a hedge was sent: {stats:?} {logs}"
    );
    clean("logs", &logs, &ALL);
    clean("handle", &format!("{handle:?} {stats:?}"), &ALL);
}

/// The reqwest adapter, as a service under the client and as middleware: refused, 503, 429,
/// timeouts.
#[tokio::test(flavor = "current_thread")]
async fn the_reqwest_adapters_events_and_errors_hold_no_uri_secret() {
    let capture = Capture::default();
    let _guard = capture.install();
    let port = server().await;
    let closed = closed_port();
    let mut shown = Vec::new();
    let rq = reqwest::Client::builder()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    let client = sturdy::ClientBuilder::new()
        .with_retry(quick())
        .build(sturdy::reqwest::ReqwestService::new(rq.clone()));
    for (p, path) in [
        (port, "/down"),
        (port, "/later"),
        (port, "/slow"),
        (closed, "/x"),
    ] {
        match client.clone().oneshot(get(p, path)).await {
            Ok(res) => shown.push(format!("{path}: {res:?}")),
            Err(e) => shown.push(format!("{path}: {}", whole(&*e))),
        }
    }
    let mw = sturdy::reqwest::SturdyMiddleware::new(|next| {
        sturdy::ClientBuilder::new().with_retry(quick()).build(next)
    });
    shown.push(format!("{mw:?}"));
    let c = reqwest_middleware::ClientBuilder::new(rq).with(mw).build();
    for (p, path) in [
        (port, "/down"),
        (port, "/later"),
        (port, "/slow"),
        (closed, "/x"),
    ] {
        // reqwest's own `Response` Debug shows its URL: only the status is read.
        match c.get(uri(p, path)).send().await {
            Ok(res) => shown.push(format!("{path}: {}", res.status())),
            Err(e) => shown.push(format!("mw {path}: {}", whole(&e))),
        }
    }
    let logs = capture.text();
    assert!(logs.contains("retrying"), "events were captured: {logs}");
    clean("logs", &logs, &ALL);
    for s in &shown {
        clean("errors", s, &ALL);
    }
}

const NEXT_PW: &str = "NextPw13kk";
const NEXT_TOK: &str = "NextTok13jj";

async fn paged_server(closed: u16) -> u16 {
    use axum::extract::State;
    use axum::routing::get;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let link = move |p: u16, path: &str| {
        format!(
            "<http://u:{NEXT_PW}@127.0.0.1:{p}{path}?api_key={KEY}&token={NEXT_TOK}>; rel=\"next\""
        )
    };
    let app = axum::Router::new()
        .route(
            "/p1",
            get(move |State((port, _)): State<(u16, u16)>| async move {
                ([("link", link(port, "/p2"))], "[1,2]")
            }),
        )
        .route(
            "/q1",
            get(move |State((_, closed)): State<(u16, u16)>| async move {
                ([("link", link(closed, "/p2"))], "[1,2]")
            }),
        )
        .route(
            "/p2",
            get(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "broken") }),
        )
        .with_state((port, closed));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

/// Pagination whose first page URI carries a password and keys, and whose `Link: rel="next"`
/// carries others: a failing second page, a next link to another origin; the pages, the
/// errors and the events.
#[tokio::test(flavor = "current_thread")]
async fn pagination_shows_no_secret_of_the_first_uri_or_the_next_links() {
    use futures_util::TryStreamExt;
    let capture = Capture::default();
    let _guard = capture.install();
    let closed = closed_port();
    let port = paged_server(closed).await;
    let client = sturdy::ClientBuilder::new()
        .with_retry(quick())
        .build(hyper_client());
    let mut shown = Vec::new();
    for path in ["/p1", "/q1"] {
        let pager = sturdy::paginate::Paginate::new(
            client.clone(),
            &uri(port, path),
            sturdy::paginate::LinkHeader::new(""),
        )
        .unwrap();
        shown.push(format!("{pager:?}"));
        let mut pages = pager.pages();
        loop {
            match pages.try_next().await {
                // `Page`'s own Debug is read in the next test.
                Ok(Some(page)) => shown.push(format!("{path} page: {}", page.number)),
                Ok(None) => break,
                Err(e) => {
                    shown.push(format!("{path} error: {}", whole(&e)));
                    break;
                }
            }
        }
        match pager.page(None, 2).await {
            Ok(p) => {
                shown.push(format!("{path} bounded: {p:?}"));
                if let Some(c) = &p.next_cursor {
                    if let Err(e) = pager.page(Some(c), 2).await {
                        shown.push(format!("{path} bounded error: {}", whole(&e)));
                    }
                }
            }
            Err(e) => shown.push(format!("{path} bounded error: {}", whole(&e))),
        }
    }
    let all = [PW, KEY, TOK, NEXT_PW, NEXT_TOK];
    clean("logs", &capture.text(), &all);
    for s in &shown {
        clean("pagination", s, &all);
    }
}

/// `Page::next` of a `LinkHeader` walk is the next link as the API sent it; the derived `Debug`
/// of `Page` prints it whole, password and query keys included (unlike `RawPage`, whose `Debug`
/// leaves out userinfo and query).
#[tokio::test(flavor = "current_thread")]
async fn a_pages_debug_shows_no_secret_of_its_next_link() {
    use futures_util::TryStreamExt;
    let closed = closed_port();
    let port = paged_server(closed).await;
    let client = sturdy::ClientBuilder::new()
        .with_retry(quick())
        .build(hyper_client());
    let pager = sturdy::paginate::Paginate::new(
        client,
        &uri(port, "/p1"),
        sturdy::paginate::LinkHeader::new(""),
    )
    .unwrap();
    let page = pager.pages().try_next().await.unwrap().unwrap();
    assert!(page.next.is_some());
    clean(
        "Page",
        &format!("{page:?}"),
        &[PW, KEY, TOK, NEXT_PW, NEXT_TOK],
    );
}
