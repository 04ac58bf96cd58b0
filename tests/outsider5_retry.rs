//! Outside tests of retries, against docs/guides/retry.md and the rustdoc of `sturdy_retry`:
//! what each attempt carries, per-request options, bodies that cannot be replayed, readiness
//! under `Buffer` and `ConcurrencyLimit(1)`, hostile `Retry-After`. Paused time, in process.
#![cfg(feature = "full")]

use crate::outsider4_common;
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Version};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use outsider4_common::*;
use sturdy::core::{find, BoxError, CallOptions, RateLimited};
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

fn url(path: &str) -> String {
    format!("http://api.example.com{path}")
}

/// A marker the caller puts in the request's extensions.
#[derive(Clone, Debug, PartialEq)]
struct Tag(u32);

/// One attempt as the server saw it.
#[derive(Clone, Debug, PartialEq)]
struct Attempt {
    method: Method,
    uri: String,
    version: Version,
    headers: HeaderMap,
    tag: Option<Tag>,
    body: Bytes,
}

type Log = Arc<Mutex<Vec<Attempt>>>;

/// A recording API: answers `codes[n]` (the last one after that) to the n-th attempt.
fn recorder<B>(
    log: Log,
    codes: Vec<u16>,
) -> impl Service<Request<B>, Response = Response<Body>, Error = BoxError, Future = BoxFut>
       + Clone
       + Send
       + Sync
       + 'static
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: std::fmt::Debug,
{
    tower::service_fn(move |req: Request<B>| -> BoxFut {
        let log = log.clone();
        let codes = codes.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.expect("a readable body").to_bytes();
            let n = {
                let mut log = log.lock().unwrap();
                log.push(Attempt {
                    method: parts.method.clone(),
                    uri: parts.uri.to_string(),
                    version: parts.version,
                    headers: parts.headers.clone(),
                    tag: parts.extensions.get::<Tag>().cloned(),
                    body,
                });
                log.len() - 1
            };
            let code = codes.get(n).or(codes.last()).copied().unwrap_or(200);
            Ok(response(code, &[]))
        })
    })
}

fn request(method: Method, body: &'static str) -> Request<Body> {
    let mut req = Request::builder()
        .method(method)
        .uri(url("/orders?x=1&y=%20"))
        .version(Version::HTTP_2)
        .header("x-custom", "a")
        .header("x-custom", "b")
        .header("authorization", "Bearer t")
        .body(Body::from(body))
        .unwrap();
    req.extensions_mut().insert(Tag(7));
    req
}

fn assert_all_same(log: &[Attempt], n: usize) {
    assert_eq!(log.len(), n, "{log:#?}");
    for (i, a) in log.iter().enumerate().skip(1) {
        assert_eq!(a.method, log[0].method, "attempt {i}: method");
        assert_eq!(a.uri, log[0].uri, "attempt {i}: uri");
        assert_eq!(a.version, log[0].version, "attempt {i}: version");
        assert_eq!(a.headers, log[0].headers, "attempt {i}: headers");
        assert_eq!(a.tag, log[0].tag, "attempt {i}: extensions");
        assert_eq!(a.body, log[0].body, "attempt {i}: body");
    }
}

/// "every attempt sends the same bytes"; in `ClientBuilder`, "one idempotency key for all
/// retries": a keyed POST's attempts carry the same method, URI, version, headers (the key
/// included), extensions and body.
#[tokio::test(start_paused = true)]
async fn every_attempt_of_a_keyed_post_is_the_same_request() {
    let log = Log::default();
    let client = ClientBuilder::new()
        .without_circuit_breaker()
        .build(recorder(log.clone(), vec![503, 502, 500, 201]));
    let res = bounded(client.oneshot(request(Method::POST, r#"{"item":"book"}"#)))
        .await
        .unwrap();
    assert_eq!(res.status(), 201);
    let log = log.lock().unwrap().clone();
    assert_all_same(&log, 4);
    let a = &log[0];
    assert_eq!(a.method, Method::POST);
    assert_eq!(a.uri, url("/orders?x=1&y=%20"));
    assert_eq!(a.version, Version::HTTP_2);
    assert!(a.headers.contains_key("idempotency-key"));
    let custom: Vec<_> = a.headers.get_all("x-custom").iter().collect();
    assert_eq!(custom, ["a", "b"]);
    assert_eq!(
        a.tag,
        Some(Tag(7)),
        "the caller's extension reached the API"
    );
    assert_eq!(a.body, r#"{"item":"book"}"#);
}

/// The retry layer alone, a PUT (retried freely): the same request every attempt.
#[tokio::test(start_paused = true)]
async fn every_attempt_of_a_put_is_the_same_request_with_the_layer_alone() {
    let log = Log::default();
    let svc = RetryLayer::new()
        .with_seed(7)
        .layer(recorder::<Body>(log.clone(), vec![503, 503, 200]));
    let res = bounded(svc.oneshot(request(Method::PUT, "payload")))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_all_same(&log.lock().unwrap(), 3);
}

/// "Put a `sturdy_core::CallOptions` in the request's extensions to override the layer for one
/// request: `.without_retries()`, `.with_max_attempts(n)`, `.with_deadline(d)`".
#[tokio::test(start_paused = true)]
async fn call_options_max_attempts_and_deadline() {
    for (opts, want_attempts) in [
        (CallOptions::new().without_retries(), 1),
        (CallOptions::new().with_max_attempts(2), 2),
        (CallOptions::new().with_max_attempts(0), 1),
        (CallOptions::new().with_max_attempts(6), 6),
    ] {
        let log = Log::default();
        let svc = RetryLayer::new()
            .with_seed(1)
            .without_budget()
            .layer(recorder::<Body>(log.clone(), vec![503]));
        let mut req = request(Method::GET, "");
        req.extensions_mut().insert(opts.clone());
        let res = bounded(svc.oneshot(req)).await.unwrap();
        assert_eq!(res.status(), 503, "{opts:?}");
        assert_eq!(log.lock().unwrap().len(), want_attempts, "{opts:?}");
    }

    // A deadline bounds attempts and sleeps together: "no sleep is started that would end past
    // it, and an attempt still running at the deadline is abandoned".
    for deadline in [ms(100), ms(700), secs(3)] {
        let calls = Arc::new(AtomicUsize::new(0));
        let c = calls.clone();
        let api = tower::service_fn(move |_req: Request<Body>| {
            c.fetch_add(1, Ordering::SeqCst);
            async {
                tokio::time::sleep(ms(200)).await;
                Ok::<_, BoxError>(response(503, &[]))
            }
        });
        let svc = RetryLayer::new()
            .with_seed(3)
            .with_max_attempts(100)
            .without_budget()
            .layer(api);
        let mut req = request(Method::GET, "");
        req.extensions_mut()
            .insert(CallOptions::new().with_deadline(deadline));
        let t = Instant::now();
        let _ = bounded(svc.oneshot(req)).await;
        assert!(
            t.elapsed() <= deadline,
            "deadline {deadline:?}: the call took {:?}",
            t.elapsed()
        );
    }
}

/// A body whose size is not known in advance (a stream), or is over the limit.
struct Chunked {
    chunks: VecDeque<Bytes>,
    exact: bool,
}

impl From<Bytes> for Chunked {
    fn from(b: Bytes) -> Self {
        Self {
            chunks: VecDeque::from([b]),
            exact: true,
        }
    }
}

impl HttpBody for Chunked {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.chunks.pop_front().map(|c| Ok(Frame::data(c))))
    }
    fn size_hint(&self) -> SizeHint {
        if self.exact {
            SizeHint::with_exact(self.chunks.iter().map(|c| c.len() as u64).sum())
        } else {
            SizeHint::default()
        }
    }
    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }
}

/// "a larger or unbounded streaming body is sent once, not retried": the 503 is returned after
/// one attempt, and the one attempt carried the whole body.
#[tokio::test(start_paused = true)]
async fn a_body_that_cannot_be_replayed_is_sent_once() {
    // A stream of unknown length.
    let log = Log::default();
    let svc = RetryLayer::new().layer(recorder::<Chunked>(log.clone(), vec![503, 200]));
    let body = Chunked {
        chunks: VecDeque::from([Bytes::from("ab"), Bytes::from("cd")]),
        exact: false,
    };
    let req = Request::put(url("/s")).body(body).unwrap();
    let res = bounded(svc.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 503);
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].body, "abcd");

    // A body over the limit, through the whole client.
    let log = Log::default();
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_body_limit(8))
        .build(recorder(log.clone(), vec![503, 200]));
    let req = Request::put(url("/big"))
        .body(Body::from("0123456789"))
        .unwrap();
    let res = bounded(client.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 503);
    assert_eq!(log.lock().unwrap().len(), 1);
    assert_eq!(log.lock().unwrap()[0].body, "0123456789");

    // A body exactly at the limit is replayed.
    let log = Log::default();
    let client = ClientBuilder::new()
        .with_retry(RetryLayer::new().with_body_limit(10))
        .build(recorder(log.clone(), vec![503, 200]));
    let req = Request::put(url("/fits"))
        .body(Body::from("0123456789"))
        .unwrap();
    let res = bounded(client.oneshot(req)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_all_same(&log.lock().unwrap(), 2);
}

/// "It works over `ConcurrencyLimit`, `GlobalConcurrencyLimit` and `Buffer`, driven by `oneshot`
/// or by a kept service (`ready().await?.call(req)`)"; and the client "under `Buffer` or a
/// concurrency limit".
#[tokio::test(start_paused = true)]
async fn kept_services_over_and_under_buffer_and_concurrency_limit_one() {
    async fn drive<S>(svc: S, n: usize) -> Vec<u16>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = BoxError>
            + Clone
            + Send
            + 'static,
        S::Future: Send,
    {
        let mut tasks = Vec::new();
        for i in 0..n {
            let mut s = svc.clone();
            tasks.push(tokio::spawn(async move {
                let res = s.ready().await?.call(get(&url(&format!("/k{i}")))).await?;
                Ok::<_, BoxError>(res.status().as_u16())
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(bounded(t).await.unwrap().unwrap());
        }
        out
    }
    // Each path fails once with 503, then answers 200.
    let api = || {
        let seen = Arc::new(Mutex::new(std::collections::HashSet::<String>::new()));
        Api::new(move |_, req| {
            if seen.lock().unwrap().insert(req.uri().path().to_owned()) {
                Act::After(ms(10), 503)
            } else {
                Act::After(ms(10), 200)
            }
        })
    };
    let retry = || RetryLayer::new().with_seed(9).without_budget();

    let a = api();
    let svc = ServiceBuilder::new()
        .layer(retry())
        .concurrency_limit(1)
        .service(a.service());
    assert!(
        drive(svc, 5).await.iter().all(|s| *s == 200),
        "Retry over ConcurrencyLimit(1)"
    );
    assert_eq!(a.calls(), 10);

    let a = api();
    let svc = ServiceBuilder::new()
        .layer(retry())
        .buffer(1)
        .service(a.service());
    assert!(
        drive(svc, 5).await.iter().all(|s| *s == 200),
        "Retry over Buffer(1)"
    );

    let a = api();
    let svc = ServiceBuilder::new()
        .buffer(1)
        .layer(retry())
        .service(a.service());
    assert!(
        drive(svc, 5).await.iter().all(|s| *s == 200),
        "Buffer(1) over Retry"
    );

    let a = api();
    let client = ClientBuilder::new().build(a.service());
    let svc = ServiceBuilder::new()
        .concurrency_limit(1)
        .service(client.clone());
    assert!(
        drive(svc, 5).await.iter().all(|s| *s == 200),
        "ConcurrencyLimit(1) over client"
    );
    let a = api();
    let client = ClientBuilder::new().build(
        ServiceBuilder::new()
            .concurrency_limit(1)
            .service(a.service()),
    );
    assert!(
        drive(client, 5).await.iter().all(|s| *s == 200),
        "client over ConcurrencyLimit(1)"
    );
}

/// The client is `Send + Sync + Clone`.
#[test]
fn the_client_is_send_sync_clone() {
    fn check<T: Send + Sync + Clone + 'static>() {}
    check::<sturdy::Client<Body>>();
    check::<RetryLayer>();
}

/// Hostile `Retry-After` on a 503 / 429: "One longer than 60 s ... is not slept: on a 429 or a
/// 503 the call fails at once with a `RateLimited { retry_after }`"; garbage, negative and
/// fractional values fall back to the backoff (capped at 20 s): no panic, no long wait.
#[tokio::test(start_paused = true)]
async fn hostile_retry_after_values() {
    for (value, long) in [
        ("99999999999999999999", true),
        ("18446744073709551615", true),
        ("61", true),
        ("Fri, 31 Dec 9999 23:59:59 GMT", true),
        ("-1", false),
        ("abc", false),
        ("1.5", false),
        ("", false),
        ("Thu, 01 Jan 1970 00:00:00 GMT", false),
        ("0", false),
    ] {
        for code in [429u16, 503] {
            let api =
                Api::new(move |_, _| Act::Status(code, vec![("retry-after", value.to_owned())]));
            let svc = RetryLayer::new()
                .with_seed(5)
                .without_budget()
                .layer(api.service());
            let t = Instant::now();
            let out = bounded(svc.oneshot(get(&url("/r")))).await;
            let took = t.elapsed();
            if long {
                let err = out.expect_err(value);
                let rl = find::<RateLimited>(&*err)
                    .unwrap_or_else(|| panic!("{value}: {}", chain(&*err)));
                assert!(rl.retry_after() > secs(60), "{value}: {rl:?}");
                assert_eq!(api.calls(), 1, "{value} {code}: not slept");
                assert_eq!(took, Duration::ZERO, "{value} {code}");
            } else {
                // With no attempt left, a valid short Retry-After ("0", a past date) ends in a
                // `RateLimited` ("with no attempt left is not slept"); garbage ends in the
                // response as it is.
                match out {
                    Ok(res) => assert_eq!(res.status().as_u16(), code),
                    Err(e) => assert!(
                        find::<RateLimited>(&*e).is_some()
                            && ["0", "Thu, 01 Jan 1970 00:00:00 GMT"].contains(&value),
                        "{value} {code}: {}",
                        chain(&*e)
                    ),
                }
                assert_eq!(api.calls(), 4, "{value} {code}");
                assert!(took <= secs(60), "{value} {code}: {took:?}");
            }
        }
    }
}
