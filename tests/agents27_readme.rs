//! README.md and the agents guide read sentence by sentence against a real axum server: the
//! error texts quoted, the MCP result's fields, `Clone + Send + Sync`, tower composition, and
//! `CallOptions` per request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use serde_json::Value;
use sturdy::core::summary::{tool_result, ErrorSummary};
use sturdy::core::{BoxError, CallOptions};
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::{Client, ClientBuilder};
use tower::{Service, ServiceBuilder, ServiceExt};

#[derive(Default)]
struct Seen {
    keys: Mutex<Vec<Option<String>>>,
    hits: AtomicUsize,
    fail_first: AtomicUsize,
}

async fn busy(State(s): State<Arc<Seen>>, headers: HeaderMap) -> impl IntoResponse {
    s.hits.fetch_add(1, Ordering::SeqCst);
    s.keys.lock().unwrap().push(
        headers
            .get("idempotency-key")
            .map(|v| v.to_str().unwrap().to_owned()),
    );
    StatusCode::SERVICE_UNAVAILABLE
}

async fn flaky(State(s): State<Arc<Seen>>) -> impl IntoResponse {
    s.hits.fetch_add(1, Ordering::SeqCst);
    let left = s.fail_first.load(Ordering::SeqCst);
    if left > 0 {
        s.fail_first.store(left - 1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    "ok".into_response()
}

async fn limited(Path(after): Path<String>, State(s): State<Arc<Seen>>) -> impl IntoResponse {
    s.hits.fetch_add(1, Ordering::SeqCst);
    (
        StatusCode::TOO_MANY_REQUESTS,
        [("retry-after", after)],
        "slow down",
    )
}

async fn hold(State(s): State<Arc<Seen>>) -> impl IntoResponse {
    s.hits.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(30)).await;
    "late"
}

async fn server() -> (String, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/busy", post(busy).get(busy))
        .route("/flaky", get(flaky))
        .route("/limited/{after}", get(limited).post(limited))
        .route("/hold", get(hold))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), seen)
}

fn client() -> Client<Incoming> {
    ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_backoff(
                    Backoff::decorrelated_jitter(
                        Duration::from_millis(2),
                        Duration::from_millis(10),
                    )
                    .unwrap(),
                )
                .with_seed(11),
        )
        .build(sturdy_chaos::http_client())
}

fn req(method: &str, url: String) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .uri(url)
        .body(Full::from("{}"))
        .unwrap()
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("hung")
}

/// Reads each request, records its idempotency key, and closes without answering.
async fn closing_server() -> (String, Arc<Mutex<Vec<Option<String>>>>) {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let keys: Arc<Mutex<Vec<Option<String>>>> = Arc::default();
    let seen = keys.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    let Ok(k) = tcp.read(&mut buf).await else {
                        return;
                    };
                    if k == 0 {
                        return;
                    }
                    got.extend_from_slice(&buf[..k]);
                }
                let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
                let key = head
                    .lines()
                    .find_map(|l| l.strip_prefix("idempotency-key: "))
                    .map(|k| k.trim().to_owned());
                seen.lock().unwrap().push(key);
                drop(tcp);
            });
        }
    });
    (format!("http://{addr}"), keys)
}

#[tokio::test]
async fn agents27_post_gives_up_naming_the_key_the_server_saw() {
    let (base, seen) = closing_server().await;
    let err = within(client().oneshot(req("POST", format!("{base}/orders?api_key=SECRET"))))
        .await
        .unwrap_err();
    let keys = seen.lock().unwrap().clone();
    assert_eq!(keys.len(), 4);
    let key = keys[0].clone().unwrap();
    assert!(keys.iter().all(|k| k.as_deref() == Some(key.as_str())));
    let text = err.to_string();
    assert!(text.starts_with("gave up after 4 attempts: "), "{text}");
    assert!(
        text.ends_with(&format!(
            "; it may have been processed: retry with the same idempotency key {key}"
        )),
        "{text}"
    );
    assert!(!format!("{text} {err:?}").contains("SECRET"));
    let s = ErrorSummary::of(&*err);
    assert_eq!(s.kind, "transport");
    assert_eq!(s.idempotency_key.as_deref(), Some(key.as_str()));
    assert_eq!(s.attempts, Some(4));
    assert!(s.may_have_been_processed);
    assert!(s.retryable);
    let out = tool_result::<Value>(Err(err));
    assert_eq!(
        out["structuredContent"]["error"]["idempotency_key"],
        key.as_str()
    );
    let text = out["content"][0]["text"].as_str().unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(!out.to_string().contains("SECRET"));
}

#[tokio::test]
async fn agents27_rate_limit_text_and_fields_agree() {
    for (after, expect_ms, expect_text) in [
        ("120", 120_000u64, "retry after 2m"),
        ("86400", 300_000, "retry after 5m"),
        ("18446744073709551615", 300_000, "retry after 5m"),
        ("99999999999999999999999999", 300_000, "retry after 5m"),
    ] {
        let (base, seen) = server().await;
        let err = within(client().oneshot(req("GET", format!("{base}/limited/{after}"))))
            .await
            .unwrap_err();
        assert_eq!(seen.hits.load(Ordering::SeqCst), 1, "{after}: {err}");
        let out = tool_result::<Value>(Err(err));
        let e = &out["structuredContent"]["error"];
        assert_eq!(e["kind"], "rate_limited", "{after}: {out}");
        assert_eq!(e["retry_after_ms"], expect_ms, "{after}: {out}");
        let text = out["content"][0]["text"].as_str().unwrap();
        assert!(text.starts_with("rate limited by 127.0.0.1"), "{text}");
        assert!(text.contains(expect_text), "{after}: {text}");
        let wait = expect_text.trim_start_matches("retry after ");
        assert!(
            text.contains(&format!("Try again in {wait}")),
            "{after}: {text}"
        );
    }
}

#[tokio::test]
async fn agents27_garbage_retry_after_never_panics() {
    for after in [
        "-1",
        "1e9",
        "0x10",
        "%20",
        "Fri, 31 Dec 9999 23:59:59 GMT",
        "Thu, 01 Jan 1970 00:00:00 GMT",
    ] {
        let (base, _seen) = server().await;
        let url = format!("{base}/limited/{}", after.replace(' ', "%20"));
        let r = within(client().oneshot(req("GET", url))).await;
        if let Err(err) = r {
            let out = tool_result::<Value>(Err(err));
            assert_eq!(out["isError"], true);
            if let Some(ms) = out["structuredContent"]["error"]["retry_after_ms"].as_u64() {
                assert!(ms <= 300_000, "{after}: {out}");
            }
        }
    }
}

#[tokio::test]
async fn agents27_client_is_clone_send_sync_and_composes_with_tower() {
    fn assert_bounds<T: Clone + Send + Sync + 'static>(_: &T) {}
    let (base, seen) = server().await;
    let c = client();
    assert_bounds(&c);
    // Under a Buffer, driven by oneshot from many tasks.
    let buffered = ServiceBuilder::new().buffer(4).service(c.clone());
    seen.fail_first.store(3, Ordering::SeqCst);
    let calls = (0..8).map(|_| {
        let svc = buffered.clone();
        let url = format!("{base}/flaky");
        async move {
            within(svc.oneshot(req("GET", url)))
                .await
                .map(|r| r.status())
        }
    });
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.unwrap(), 200);
    }
    // Over a ConcurrencyLimit(1) and under a Timeout, a kept service driven in a loop.
    let mut kept = ServiceBuilder::new()
        .timeout(Duration::from_secs(5))
        .concurrency_limit(1)
        .service(c);
    seen.fail_first.store(2, Ordering::SeqCst);
    for _ in 0..10 {
        let res = within(async {
            kept.ready()
                .await?
                .call(req("GET", format!("{base}/flaky")))
                .await
        })
        .await
        .unwrap();
        assert_eq!(res.status(), 200);
    }
}

#[tokio::test]
async fn agents27_call_options_per_request() {
    let (base, seen) = server().await;
    let c = client();
    // without_retries: one attempt.
    let mut r = req("GET", format!("{base}/busy"));
    r.extensions_mut()
        .insert(CallOptions::new().without_retries());
    let res = within(c.clone().oneshot(r)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(seen.hits.load(Ordering::SeqCst), 1);
    // with_max_attempts(2).
    let mut r = req("GET", format!("{base}/busy"));
    r.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(2));
    let _ = within(c.clone().oneshot(r)).await;
    assert_eq!(seen.hits.load(Ordering::SeqCst), 3);
    // with_max_attempts(0) is taken as 1.
    let mut r = req("GET", format!("{base}/busy"));
    r.extensions_mut()
        .insert(CallOptions::new().with_max_attempts(0));
    let _ = within(c.clone().oneshot(r)).await;
    assert_eq!(seen.hits.load(Ordering::SeqCst), 4);
    // with_idempotency_key: the server sees it on every attempt, for a GET too.
    let mut r = req("GET", format!("{base}/busy"));
    r.extensions_mut().insert(
        CallOptions::new()
            .with_idempotency_key("order-27")
            .with_max_attempts(2),
    );
    let _ = within(c.clone().oneshot(r)).await.unwrap();
    let keys = seen.keys.lock().unwrap().clone();
    assert_eq!(
        &keys[keys.len() - 2..],
        &[Some("order-27".into()), Some("order-27".into())]
    );
    // with_deadline: a held request ends at the deadline.
    let mut r = req("GET", format!("{base}/hold"));
    r.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_millis(200)));
    let t = tokio::time::Instant::now();
    let err = within(c.clone().oneshot(r)).await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(ErrorSummary::of(&*err).kind, "timeout", "{err}");
    // with_attempt_timeout: each attempt ends, the call is retried.
    let before = seen.hits.load(Ordering::SeqCst);
    let mut r = req("GET", format!("{base}/hold"));
    r.extensions_mut()
        .insert(CallOptions::new().with_attempt_timeout(Duration::from_millis(50)));
    let err = within(c.clone().oneshot(r)).await.unwrap_err();
    assert_eq!(seen.hits.load(Ordering::SeqCst) - before, 4, "{err}");
    assert!(
        err.to_string().starts_with("gave up after 4 attempts: "),
        "{err}"
    );
}

#[test]
fn agents27_io_errors_summarised() {
    use std::io::{Error, ErrorKind as Io};
    let refused = Error::new(Io::ConnectionRefused, "refused");
    let s = ErrorSummary::of(&refused);
    assert_eq!(s.kind, "connect");
    assert!(!s.may_have_been_processed);
    assert!(s.retryable);
    let reset = Error::new(Io::ConnectionReset, "reset");
    let s = ErrorSummary::of(&reset);
    assert_eq!(s.kind, "transport");
    assert!(s.may_have_been_processed);
    let timed = Error::new(Io::TimedOut, "slow");
    assert_eq!(ErrorSummary::of(&timed).kind, "timeout");
    let boxed: BoxError = Box::new(Error::new(Io::ConnectionRefused, "refused"));
    let out = tool_result::<Value>(Err(boxed));
    assert_eq!(out["structuredContent"]["error"]["kind"], "connect");
    assert!(out["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("the request was not processed"));
}

async fn limited_once(State(s): State<Arc<Seen>>) -> impl IntoResponse {
    let n = s.hits.fetch_add(1, Ordering::SeqCst);
    if n == 0 {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "wait",
        )
            .into_response();
    }
    "ok".into_response()
}

#[tokio::test]
async fn agents27_a_deadline_shorter_than_retry_after_is_kept() {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/once", get(limited_once))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut r = req("GET", format!("http://{addr}/once"));
    r.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_millis(300)));
    let t = tokio::time::Instant::now();
    let out = within(client().oneshot(r)).await;
    let took = t.elapsed();
    assert!(
        took < Duration::from_millis(700),
        "a 300 ms deadline took {took:?} ({:?})",
        out.as_ref().map(http::Response::status)
    );
    if let Err(err) = out {
        let s = ErrorSummary::of(&*err);
        assert!(s.kind == "rate_limited" || s.kind == "timeout", "{s:?}");
        assert!(s.retryable, "{s:?}");
    }
}

#[tokio::test]
async fn agents27_page_timeout_bounds_the_inner_retries() {
    let (base, seen) = server().await;
    let slow_retry = ClientBuilder::new()
        .with_retry(
            RetryLayer::new()
                .with_backoff(
                    Backoff::decorrelated_jitter(
                        Duration::from_millis(100),
                        Duration::from_millis(200),
                    )
                    .unwrap(),
                )
                .with_max_attempts(20)
                .with_seed(2),
        )
        .build(sturdy_chaos::http_client());
    let pager = sturdy::paginate::Paginate::builder(
        slow_retry,
        &format!("{base}/busy?api_key=SECRET"),
        sturdy::paginate::JsonCursor::new("/data", "/next"),
    )
    .with_page_timeout(Duration::from_millis(300))
    .build()
    .unwrap();
    let t = tokio::time::Instant::now();
    let err = within(pager.page(None, 5)).await.unwrap_err();
    assert!(
        t.elapsed() < Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(err.kind(), &sturdy::core::ErrorKind::Timeout, "{err}");
    assert!(!format!("{err} {err:?}").contains("SECRET"));
    let hits = seen.hits.load(Ordering::SeqCst);
    assert!((1..=4).contains(&hits), "{hits}");
    let out = tool_result::<Value>(Err(BoxError::from(err)));
    assert_eq!(
        out["structuredContent"]["error"]["retryable"], true,
        "{out}"
    );
}

#[tokio::test]
async fn agents27_keys_no_header_can_carry_are_sent_as_digests() {
    let (base, seen) = server().await;
    let c = client();
    let send = |key: &'static str| {
        let c = c.clone();
        let url = format!("{base}/busy");
        async move {
            let mut r = req("POST", url);
            r.extensions_mut().insert(
                CallOptions::new()
                    .with_idempotency_key(key)
                    .with_max_attempts(2),
            );
            let _ = within(c.oneshot(r)).await;
        }
    };
    send("a\tb ").await;
    send("a\tb ").await;
    send(" a\tb").await;
    send("user-key-1").await;
    let mut r = req("POST", format!("{base}/busy"));
    r.headers_mut().insert(
        "idempotency-key",
        http::HeaderValue::from_static("hdr-key-9"),
    );
    let _ = within(c.clone().oneshot(r)).await;
    let keys: Vec<String> = seen
        .keys
        .lock()
        .unwrap()
        .iter()
        .map(|k| k.clone().unwrap())
        .collect();
    assert_eq!(keys.len(), 12, "{keys:?}");
    let digest = |k: &str| {
        let hex = k
            .strip_prefix("sturdy-sha256-")
            .unwrap_or_else(|| panic!("{k}"));
        assert_eq!(hex.len(), 64, "{k}");
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()), "{k}");
    };
    for k in &keys[..6] {
        digest(k);
    }
    assert_eq!(keys[0], keys[1]);
    assert_eq!(keys[0], keys[3], "the same key, the same digest every time");
    assert_ne!(keys[0], keys[4], "another key, another digest");
    assert_eq!(&keys[6..8], &["user-key-1", "user-key-1"]);
    assert!(keys[8..].iter().all(|k| k == "hdr-key-9"), "{keys:?}");
}
