//! What every attempt of a retried call carries: method, URI, version, every header value in
//! order (and its sensitivity), the caller's extensions, and the body, through `RetryLayer` alone
//! and through `ClientBuilder`, with layers below that add or change headers. Paused time.
#![cfg(feature = "full")]

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderName;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use sturdy::core::{BoxError, CallOptions};
use sturdy::idempotency::client::IdempotencyKeyLayer;
use sturdy::retry::RetryLayer;
use sturdy::ClientBuilder;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

/// The caller's own extension.
#[derive(Clone, Debug, PartialEq)]
struct Tag(u64);

/// A second extension of the caller's, holding a larger value.
#[derive(Clone, Debug, PartialEq)]
struct Note(Vec<String>);

/// What one attempt carried.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    method: Method,
    uri: String,
    version: Version,
    /// Each name's values in order, with their sensitivity.
    per_name: BTreeMap<String, Vec<(Vec<u8>, bool)>>,
    /// Every value in the map's iteration order.
    order: Vec<(String, Vec<u8>)>,
    count: usize,
    tag: Option<Tag>,
    note: Option<Note>,
    opts: Option<CallOptions>,
    body: Bytes,
}

fn per_name(h: &HeaderMap) -> BTreeMap<String, Vec<(Vec<u8>, bool)>> {
    let mut m = BTreeMap::new();
    for name in h.keys() {
        let vals = h
            .get_all(name)
            .iter()
            .map(|v| (v.as_bytes().to_vec(), v.is_sensitive()))
            .collect();
        m.insert(name.as_str().to_owned(), vals);
    }
    m
}

fn order(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

#[derive(Clone, Debug)]
enum Ans {
    Status(u16, Option<&'static str>),
    Refused,
    Reset,
    Hang,
}

type Log = Arc<Mutex<Vec<Seen>>>;
type BoxFut = Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, BoxError>> + Send>>;

/// Answers `script[n]` to the n-th attempt (the last entry after that) and logs what came.
fn recorder(
    log: Log,
    script: Vec<Ans>,
) -> impl Service<
    Request<Full<Bytes>>,
    Response = Response<Full<Bytes>>,
    Error = BoxError,
    Future = BoxFut,
> + Clone
       + Send
       + Sync
       + 'static {
    tower::service_fn(move |req: Request<Full<Bytes>>| -> BoxFut {
        let log = log.clone();
        let script = script.clone();
        Box::pin(async move {
            let (parts, body) = req.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            let n = {
                let mut l = log.lock().unwrap();
                l.push(Seen {
                    method: parts.method.clone(),
                    uri: parts.uri.to_string(),
                    version: parts.version,
                    per_name: per_name(&parts.headers),
                    order: order(&parts.headers),
                    count: parts.headers.len(),
                    tag: parts.extensions.get::<Tag>().cloned(),
                    note: parts.extensions.get::<Note>().cloned(),
                    opts: parts.extensions.get::<CallOptions>().cloned(),
                    body,
                });
                l.len() - 1
            };
            match script.get(n).or(script.last()).cloned().unwrap() {
                Ans::Status(s, ra) => {
                    let mut b = Response::builder().status(s);
                    if let Some(ra) = ra {
                        b = b.header("retry-after", ra);
                    }
                    Ok(b.body(Full::default()).unwrap())
                }
                Ans::Refused => Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionRefused,
                    "refused",
                )
                .into()),
                Ans::Reset => {
                    Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset").into())
                }
                Ans::Hang => std::future::pending().await,
            }
        })
    })
}

/// A layer below the retry layer that adds its own headers (one new name, one more `accept`,
/// one replaced `x-replaced`), changes the URI, method and extensions of what it passes on.
#[derive(Clone)]
struct Meddle;

impl<S> Layer<S> for Meddle {
    type Service = MeddleSvc<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MeddleSvc(inner)
    }
}

#[derive(Clone)]
struct MeddleSvc<S>(S);

impl<S> Service<Request<Full<Bytes>>> for MeddleSvc<S>
where
    S: Service<Request<Full<Bytes>>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }
    fn call(&mut self, mut req: Request<Full<Bytes>>) -> S::Future {
        let h = req.headers_mut();
        h.append("x-below", HeaderValue::from_static("1"));
        h.append("accept", HeaderValue::from_static("below/*"));
        h.insert("x-replaced", HeaderValue::from_static("by-below"));
        req.extensions_mut().insert(Tag(999));
        self.0.call(req)
    }
}

/// The headers of the cases: none, one, two names, two values of one name, two cookies,
/// three, many, and a sensitive one.
fn header_sets() -> Vec<(&'static str, Vec<(&'static str, &'static str, bool)>)> {
    let mut many = Vec::new();
    for (i, n) in [
        "accept",
        "x-a",
        "cookie",
        "x-b",
        "accept",
        "x-c",
        "cookie",
        "x-a",
        "user-agent",
        "x-d",
        "accept",
        "x-e",
    ]
    .iter()
    .enumerate()
    {
        let v: &'static str = Box::leak(format!("v{i}").into_boxed_str());
        many.push((*n, v, false));
    }
    vec![
        ("none", vec![]),
        ("one", vec![("accept", "application/json", false)]),
        (
            "two names",
            vec![("accept", "application/json", false), ("x-a", "1", false)],
        ),
        (
            "two accept",
            vec![("accept", "text/html", false), ("accept", "*/*", false)],
        ),
        (
            "two cookies",
            vec![("cookie", "a=1", false), ("cookie", "b=2", false)],
        ),
        (
            "three",
            vec![
                ("accept", "text/html", false),
                ("x-a", "1", false),
                ("accept", "*/*", false),
            ],
        ),
        ("many", many),
        (
            "sensitive one",
            vec![("authorization", "Bearer secret", true)],
        ),
        (
            "sensitive two",
            vec![
                ("authorization", "Bearer secret", true),
                ("x-a", "1", false),
            ],
        ),
        (
            "sensitive two same",
            vec![("x-token", "s1", true), ("x-token", "s2", false)],
        ),
        (
            "sensitive three",
            vec![
                ("authorization", "Bearer secret", true),
                ("x-a", "1", false),
                ("cookie", "sid=9", true),
            ],
        ),
    ]
}

fn request(
    method: Method,
    uri: &str,
    version: Version,
    headers: &[(&'static str, &'static str, bool)],
    opts: Option<CallOptions>,
) -> Request<Full<Bytes>> {
    let body = if method == Method::GET || method == Method::DELETE {
        Full::default()
    } else {
        Full::from(r#"{"amount":10}"#)
    };
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .version(version)
        .body(body)
        .unwrap();
    for (n, v, s) in headers {
        let mut v = HeaderValue::from_static(v);
        v.set_sensitive(*s);
        req.headers_mut().append(HeaderName::from_static(n), v);
    }
    req.extensions_mut().insert(Tag(42));
    req.extensions_mut()
        .insert(Note(vec!["a".into(), "b".into()]));
    if let Some(o) = opts {
        req.extensions_mut().insert(o);
    }
    req
}

type Svc = BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError>;

/// Checks that every attempt carries what `original` carried; `key` names a header that was
/// added above the retry layer (the same value on every attempt), `below` whether `Meddle` sat
/// below.
fn check(case: &str, original: &Seen, seen: &[Seen], key: Option<&str>, below: bool) {
    assert!(!seen.is_empty(), "{case}: no attempt");
    let key_value = key.map(|k| {
        let v = seen[0]
            .per_name
            .get(k)
            .unwrap_or_else(|| panic!("{case}: no {k} on the first attempt"));
        assert_eq!(v.len(), 1, "{case}: {k} on the first attempt: {v:?}");
        v[0].clone()
    });
    for (i, s) in seen.iter().enumerate() {
        let what = format!("{case}: attempt {} of {}", i + 1, seen.len());
        assert_eq!(s.method, original.method, "{what}: method");
        assert_eq!(s.uri, original.uri, "{what}: uri");
        assert_eq!(s.version, original.version, "{what}: version");
        assert_eq!(s.body, original.body, "{what}: body");
        assert_eq!(s.note, original.note, "{what}: extension Note");
        assert_eq!(s.opts, original.opts, "{what}: CallOptions");
        let mut want = original.per_name.clone();
        if let (Some(k), Some(v)) = (key, key_value.clone()) {
            want.entry(k.to_owned()).or_default().push(v);
        }
        if below {
            want.entry("x-below".into())
                .or_default()
                .push((b"1".to_vec(), false));
            want.entry("accept".into())
                .or_default()
                .push((b"below/*".to_vec(), false));
            want.insert("x-replaced".into(), vec![(b"by-below".to_vec(), false)]);
            assert_eq!(s.tag, Some(Tag(999)), "{what}: Tag");
        } else {
            assert_eq!(s.tag, original.tag, "{what}: Tag");
        }
        assert_eq!(s.per_name, want, "{what}: headers");
    }
}

fn expected(req: &Request<Full<Bytes>>) -> Seen {
    Seen {
        method: req.method().clone(),
        uri: req.uri().to_string(),
        version: req.version(),
        per_name: per_name(req.headers()),
        order: order(req.headers()),
        count: req.headers().len(),
        tag: req.extensions().get::<Tag>().cloned(),
        note: req.extensions().get::<Note>().cloned(),
        opts: req.extensions().get::<CallOptions>().cloned(),
        body: match req.method().as_str() {
            "GET" | "DELETE" => Bytes::new(),
            _ => Bytes::from_static(br#"{"amount":10}"#),
        },
    }
}

fn retry(n: u32) -> RetryLayer {
    RetryLayer::new()
        .with_seed(25)
        .without_budget()
        .with_max_attempts(n)
}

const URIS: &[&str] = &[
    "http://api.example.com/orders?x=1&y=%20z&x=2",
    "http://user:pa%40ss@api.example.com:8443/a//b/./c/../%2F;p=1?q#frag",
    "http://api.example.com/*",
    "http://[::1]:8080/%E2%82%AC?%FF=%00",
];

/// GET, PUT, DELETE (retried freely) through 503s, every header set, attempts 1 to 5.
#[tokio::test(start_paused = true)]
async fn every_attempt_of_a_safe_call_carries_the_whole_head() {
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        for (name, hs) in header_sets() {
            for n in 1..=5u32 {
                for (ui, uri) in URIS.iter().enumerate() {
                    let version = [Version::HTTP_11, Version::HTTP_10, Version::HTTP_2][ui % 3];
                    let log: Log = Arc::default();
                    let svc = retry(n).layer(recorder(log.clone(), vec![Ans::Status(503, None)]));
                    let req = request(method.clone(), uri, version, &hs, None);
                    let want = expected(&req);
                    let res = svc.oneshot(req).await.unwrap();
                    assert_eq!(res.status(), 503);
                    let seen = log.lock().unwrap().clone();
                    let case = format!("{method} {name} n={n} {uri}");
                    assert_eq!(seen.len(), n as usize, "{case}");
                    check(&case, &want, &seen, None, false);
                }
            }
        }
    }
}

/// The same through a mix of failures: 503, 429 with Retry-After, a reset, a refused
/// connection, then 200.
#[tokio::test(start_paused = true)]
async fn every_attempt_through_mixed_failures_carries_the_whole_head() {
    let script = vec![
        Ans::Status(503, None),
        Ans::Status(429, Some("1")),
        Ans::Reset,
        Ans::Refused,
        Ans::Status(503, Some("0")),
        Ans::Status(200, None),
    ];
    for method in [Method::GET, Method::PUT, Method::DELETE] {
        for (name, hs) in header_sets() {
            let log: Log = Arc::default();
            let svc = retry(6).layer(recorder(log.clone(), script.clone()));
            let req = request(method.clone(), URIS[0], Version::HTTP_11, &hs, None);
            let want = expected(&req);
            let res = svc.oneshot(req).await.unwrap();
            assert_eq!(res.status(), 200);
            let seen = log.lock().unwrap().clone();
            assert_eq!(seen.len(), 6);
            check(&format!("{method} {name}"), &want, &seen, None, false);
        }
    }
}

/// POST and PATCH keyed three ways (the caller's header, `CallOptions`, the layer's own key),
/// through resets, 503s and 429s.
#[tokio::test(start_paused = true)]
async fn every_attempt_of_a_keyed_post_carries_the_whole_head_and_one_key() {
    let script = vec![
        Ans::Reset,
        Ans::Status(503, None),
        Ans::Status(429, Some("2")),
        Ans::Status(502, None),
    ];
    for method in [Method::POST, Method::PATCH] {
        for (name, hs) in header_sets() {
            for how in ["header", "options", "layer"] {
                for n in [1u32, 2, 3, 4, 7] {
                    let log: Log = Arc::default();
                    let svc = ServiceBuilder::new()
                        .layer(IdempotencyKeyLayer::new())
                        .layer(retry(n))
                        .service(recorder(log.clone(), script.clone()));
                    let mut hs = hs.clone();
                    let opts = match how {
                        "header" => {
                            hs.push(("idempotency-key", "caller-key-1", false));
                            None
                        }
                        "options" => Some(CallOptions::new().with_idempotency_key("opt-key-1")),
                        _ => None,
                    };
                    let req = request(method.clone(), URIS[1], Version::HTTP_11, &hs, opts);
                    let want = expected(&req);
                    let _ = svc.oneshot(req).await;
                    let seen = log.lock().unwrap().clone();
                    let case = format!("{method} {name} key by {how} n={n}");
                    assert_eq!(seen.len(), n as usize, "{case}");
                    let key = if how == "header" {
                        None
                    } else {
                        Some("idempotency-key")
                    };
                    check(&case, &want, &seen, key, false);
                    if how == "options" {
                        assert_eq!(
                            seen[0].per_name["idempotency-key"][0].0,
                            b"opt-key-1".to_vec(),
                            "{case}"
                        );
                    }
                }
            }
        }
    }
}

/// A POST without a key is retried only after a refused connection; every attempt carries it all.
#[tokio::test(start_paused = true)]
async fn an_unkeyed_post_replayed_after_refusals_carries_the_whole_head() {
    for (name, hs) in header_sets() {
        let log: Log = Arc::default();
        let svc = retry(4).layer(recorder(
            log.clone(),
            vec![Ans::Refused, Ans::Refused, Ans::Status(503, None)],
        ));
        let req = request(Method::POST, URIS[0], Version::HTTP_11, &hs, None);
        let want = expected(&req);
        let res = svc.oneshot(req).await.unwrap();
        assert_eq!(res.status(), 503, "{name}");
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.len(), 3, "{name}");
        check(&format!("POST {name}"), &want, &seen, None, false);
    }
}

/// A layer below the retry layer that adds and replaces headers and changes an extension: its
/// changes show once on every attempt, never carried into the next one's copy.
#[tokio::test(start_paused = true)]
async fn a_layer_below_does_not_leak_into_the_next_attempt() {
    for method in [Method::GET, Method::POST] {
        for (name, hs) in header_sets() {
            for n in [2u32, 3, 5] {
                let log: Log = Arc::default();
                let svc = ServiceBuilder::new()
                    .layer(IdempotencyKeyLayer::new())
                    .layer(retry(n))
                    .layer(Meddle)
                    .service(recorder(log.clone(), vec![Ans::Status(503, None)]));
                let mut hs = hs.clone();
                hs.push(("x-replaced", "original", false));
                let req = request(method.clone(), URIS[0], Version::HTTP_11, &hs, None);
                let want = expected(&req);
                let _ = svc.oneshot(req).await;
                let seen = log.lock().unwrap().clone();
                let case = format!("{method} {name} n={n} below");
                assert_eq!(seen.len(), n as usize, "{case}");
                let key = (method == Method::POST).then_some("idempotency-key");
                check(&case, &want, &seen, key, true);
            }
        }
    }
}

/// The map's iteration order (names in the order they were first added) is the same on every
/// attempt as on the caller's request.
#[tokio::test(start_paused = true)]
async fn every_attempt_keeps_the_order_of_header_names() {
    for (name, hs) in header_sets() {
        let log: Log = Arc::default();
        let svc = retry(3).layer(recorder(log.clone(), vec![Ans::Status(503, None)]));
        let req = request(Method::GET, URIS[0], Version::HTTP_11, &hs, None);
        let want = expected(&req);
        let _ = svc.oneshot(req).await.unwrap();
        let seen = log.lock().unwrap().clone();
        for (i, s) in seen.iter().enumerate() {
            assert_eq!(s.order, want.order, "{name}: attempt {}", i + 1);
            assert_eq!(s.count, want.count, "{name}: attempt {}", i + 1);
        }
    }
}

fn client(log: &Log, script: Vec<Ans>, n: u32, timeout: Duration) -> Svc {
    ClientBuilder::new()
        .with_retry(retry(n))
        .with_attempt_timeout(timeout)
        .build(recorder(log.clone(), script))
}

/// Through `ClientBuilder` (key layer, retry, breaker, rate limit, attempt timeout): attempts
/// cut by the attempt timeout, 503s and 429s, every method.
#[tokio::test(start_paused = true)]
async fn every_attempt_through_client_builder_carries_the_whole_head() {
    let script = vec![
        Ans::Hang,
        Ans::Status(503, None),
        Ans::Status(429, Some("1")),
        Ans::Reset,
        Ans::Status(200, None),
    ];
    for method in [
        Method::GET,
        Method::PUT,
        Method::DELETE,
        Method::POST,
        Method::PATCH,
    ] {
        for (name, hs) in header_sets() {
            for how in ["none", "header", "options"] {
                let log: Log = Arc::default();
                let svc = client(&log, script.clone(), 5, Duration::from_millis(300));
                let mut hs = hs.clone();
                let opts = match how {
                    "header" => {
                        hs.push(("idempotency-key", "caller-key-2", false));
                        None
                    }
                    "options" => Some(
                        CallOptions::new()
                            .with_idempotency_key("opt-key-2")
                            .with_max_attempts(5),
                    ),
                    _ => None,
                };
                let req = request(method.clone(), URIS[1], Version::HTTP_11, &hs, opts);
                let want = expected(&req);
                let res = svc.oneshot(req).await;
                let seen = log.lock().unwrap().clone();
                let case = format!("{method} {name} key by {how}");
                assert_eq!(res.unwrap().status(), 200, "{case}");
                assert_eq!(seen.len(), 5, "{case}");
                // A key given through `CallOptions` is sent whatever the method.
                let keyed = (matches!(method, Method::POST | Method::PATCH) && how == "none")
                    || how == "options";
                check(
                    &case,
                    &want,
                    &seen,
                    keyed.then_some("idempotency-key"),
                    false,
                );
            }
        }
    }
}

/// Through `ClientBuilder` with auth and a version pin below the retry layer: each attempt
/// carries one `Authorization` (sensitive) and one version header, and the caller's headers.
#[tokio::test(start_paused = true)]
async fn auth_and_version_below_retry_add_their_headers_once_per_attempt() {
    use sturdy::auth::{AuthLayer, SecretString};
    use sturdy::version::VersionLayer;
    for (name, hs) in header_sets() {
        if hs.iter().any(|(n, _, _)| *n == "authorization") {
            continue;
        }
        let log: Log = Arc::default();
        let svc = ClientBuilder::new()
            .with_retry(retry(4))
            .with_auth(AuthLayer::bearer(SecretString::from("tok-1")).unwrap())
            .with_version(VersionLayer::header("x-api-version", "2024-01-01").unwrap())
            .build(recorder(log.clone(), vec![Ans::Status(503, None)]));
        let req = request(Method::GET, URIS[0], Version::HTTP_11, &hs, None);
        let want = expected(&req);
        let _ = svc.oneshot(req).await;
        let seen = log.lock().unwrap().clone();
        assert_eq!(seen.len(), 4, "{name}");
        for (i, s) in seen.iter().enumerate() {
            let mut got = s.per_name.clone();
            let auth = got.remove("authorization").unwrap_or_default();
            assert_eq!(
                auth,
                vec![(b"Bearer tok-1".to_vec(), true)],
                "{name}: attempt {}",
                i + 1
            );
            let v = got.remove("x-api-version").unwrap_or_default();
            assert_eq!(
                v,
                vec![(b"2024-01-01".to_vec(), false)],
                "{name}: attempt {}",
                i + 1
            );
            assert_eq!(got, want.per_name, "{name}: attempt {}", i + 1);
        }
    }
}

/// Tries refused before they were sent (a quota with no wait below the retry layer) are
/// replayed with the whole head: the refused try's request went no further.
#[tokio::test(start_paused = true)]
async fn a_try_refused_below_is_replayed_with_the_whole_head() {
    use sturdy::ratelimit::{Quota, RateLimitLayer};
    for method in [Method::GET, Method::POST] {
        for (name, hs) in header_sets() {
            let log: Log = Arc::default();
            let svc = ClientBuilder::new()
                .without_idempotency()
                .with_retry(retry(4))
                .with_rate_limit(
                    RateLimitLayer::new(Quota::per_second(1).unwrap().with_burst(1).unwrap())
                        .with_max_wait(Duration::ZERO),
                )
                .build(recorder(log.clone(), vec![Ans::Status(200, None)]));
            let first = request(method.clone(), URIS[0], Version::HTTP_11, &hs, None);
            let second = request(method.clone(), URIS[1], Version::HTTP_11, &hs, None);
            let want = expected(&second);
            let (a, b) = tokio::join!(svc.clone().oneshot(first), svc.clone().oneshot(second));
            assert_eq!(a.unwrap().status(), 200, "{method} {name}");
            assert_eq!(b.unwrap().status(), 200, "{method} {name}");
            let seen = log.lock().unwrap().clone();
            assert_eq!(seen.len(), 2, "{method} {name}");
            check(
                &format!("{method} {name} refused"),
                &want,
                &seen[1..],
                None,
                false,
            );
        }
    }
}
