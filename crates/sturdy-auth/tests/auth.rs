//! Token caching, single flight, refresh and replay, on an in-process token endpoint with paused
//! time.

use crate::support;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy_auth::{AuthLayer, ClientAuth, ClientCredentials, TokenSource};
use sturdy_core::{BoxError, ErrorKind};
use support::{get, Api, TokenEndpoint};
use tokio::time::Instant;
use tower::{service_fn, Layer, ServiceExt};

#[tokio::test(start_paused = true)]
async fn two_hundred_concurrent_calls_on_a_cold_cache_make_one_token_request() {
    let ep = TokenEndpoint::new(3_600);
    let api = Api::accept_all_tokens();
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    let calls: Vec<_> = (0..200)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(ep.count(), 1);
    assert!(api.calls.lock().unwrap().iter().all(|(t, _)| t == "tok-1"));

    // After the lifetime, one more (for 200 more concurrent calls).
    tokio::time::advance(Duration::from_secs(3_600)).await;
    let calls: Vec<_> = (0..200)
        .map(|_| tokio::spawn(svc.clone().oneshot(get())))
        .collect();
    for c in calls {
        c.await.unwrap().unwrap();
    }
    assert_eq!(ep.count(), 2);
}

/// Lets a background token request (20 ms) finish.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn value(t: &sturdy_auth::Token) -> &str {
    sturdy_auth::ExposeSecret::expose_secret(t.secret())
}

#[tokio::test(start_paused = true)]
async fn refresh_happens_skew_before_expiry_in_the_background() {
    let ep = TokenEndpoint::new(3_600);
    let src = ep.source();
    src.get().await.unwrap();
    tokio::time::advance(Duration::from_secs(3_600 - 61)).await;
    src.get().await.unwrap();
    settle().await;
    assert_eq!(ep.count(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    // Due: the still-valid token is returned at once, and the refresh runs meanwhile.
    let started = tokio::time::Instant::now();
    let t = src.get().await.unwrap();
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "no wait while a token is valid"
    );
    assert_eq!(value(&t), "tok-1");
    for _ in 0..20 {
        assert_eq!(value(&src.get().await.unwrap()), "tok-1");
    }
    settle().await;
    assert_eq!(ep.count(), 2, "refreshed 60 s before expiry, once");
    assert_eq!(value(&src.get().await.unwrap()), "tok-2");
}

#[tokio::test(start_paused = true)]
async fn a_30_second_token_is_not_refreshed_on_every_call() {
    let ep = TokenEndpoint::new(30);
    let src = ep.source();
    for _ in 0..140 {
        src.get().await.unwrap();
        tokio::time::advance(Duration::from_millis(100)).await;
    }
    // 14 s of calls: the skew is capped at half the lifetime (15 s), so still one token.
    assert_eq!(ep.count(), 1);
    tokio::time::advance(Duration::from_secs(2)).await;
    src.get().await.unwrap();
    settle().await;
    assert_eq!(ep.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_keeps_the_valid_token_and_backs_off() {
    let ep = TokenEndpoint::new(100);
    let src = ep.source();
    let first = src.get().await.unwrap();
    // At 60 s the token is due (skew 50 s); the endpoint is down for a while.
    tokio::time::advance(Duration::from_secs(60)).await;
    for _ in 0..5 {
        ep.fail_next(503, "unavailable");
    }
    let t = src.get().await.unwrap();
    assert!(t.same_value(&first), "kept the still-valid token");
    settle().await;
    assert_eq!(ep.count(), 2);
    // Many calls during the backoff: no new token request.
    for _ in 0..50 {
        assert!(src.get().await.unwrap().same_value(&first));
    }
    settle().await;
    assert_eq!(ep.count(), 2);
    // After the backoff (1 s), one more try (still failing), then 2 s.
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(src.get().await.unwrap().same_value(&first));
    settle().await;
    assert_eq!(ep.count(), 3);
    tokio::time::advance(Duration::from_secs(1)).await;
    src.get().await.unwrap();
    settle().await;
    assert_eq!(ep.count(), 3, "backing off 2 s now");
    // Once the old token has expired and the endpoint still fails, the error shows.
    tokio::time::advance(Duration::from_secs(40)).await;
    ep.script.lock().unwrap().clear();
    ep.fail_next(503, "unavailable");
    let err = src.get().await.unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
    assert!(sturdy_core::classify::classify_error(&err).is_retryable());
}

#[tokio::test(start_paused = true)]
async fn concurrent_callers_share_one_failure_and_then_back_off() {
    let ep = TokenEndpoint::new(100);
    ep.fail_next(401, r#"{"error":"invalid_client"}"#);
    let src = ep.source();
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let s = src.clone();
            tokio::spawn(async move { s.get().await })
        })
        .collect();
    for c in calls {
        let err = c.await.unwrap().unwrap_err();
        assert!(
            err.to_string().contains("client id or secret is wrong"),
            "{err}"
        );
        assert_eq!(sturdy_core::classify::classify_error(&err), ErrorKind::Auth);
    }
    assert_eq!(ep.count(), 1);
    // Immediately again: the endpoint is not hammered.
    assert!(src.get().await.is_err());
    assert_eq!(ep.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_401_refreshes_once_and_replays_the_same_body() {
    let ep = TokenEndpoint::new(3_600);
    let api = Api::default();
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    // The API first accepts only tok-2: tok-1 is "revoked".
    api.valid.lock().unwrap().push("tok-2".into());
    let req = Request::post("http://api.example.com/orders")
        .body(Full::from(r#"{"n":1}"#))
        .unwrap();
    let res = svc.clone().oneshot(req).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(ep.count(), 2);
    let calls = api.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].0, "tok-1");
    assert_eq!(calls[1].0, "tok-2");
    assert_eq!(calls[0].1, calls[1].1);
    assert_eq!(calls[1].1, Bytes::from_static(br#"{"n":1}"#));
}

/// An API that refuses every token (a wrong audience, a misconfigured API) must not cost a
/// token request per call. The first 401 fetches a new token and replays, as for a revoked
/// token; a token the API then refuses before it accepted anything with it is kept a while (1 s
/// from its fetch, doubling with each such token in a row, at most 60 s), its 401s returned
/// without a replay; a token that worked and is then refused is replaced at once.
#[tokio::test(start_paused = true)]
async fn an_api_that_refuses_every_token_costs_a_token_request_per_hold_not_per_call() {
    let ep = TokenEndpoint::new(86_400);
    let api = Api::default();
    api.accept_only(&["nobody"]);
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    let call = || {
        let svc = svc.clone();
        async move { svc.oneshot(get()).await.unwrap().status() }
    };
    let api_calls = || api.calls.lock().unwrap().len();
    // Each hold counts from the token's fetch, which came 5 ms (the replay) before the call
    // that fetched it ended.
    let replay = Duration::from_millis(5);
    assert_eq!(call().await, StatusCode::UNAUTHORIZED);
    let mut fetched = Instant::now() - replay;
    assert_eq!((ep.count(), api_calls()), (2, 2));
    for _ in 0..50 {
        assert_eq!(call().await, StatusCode::UNAUTHORIZED);
    }
    assert_eq!(
        (ep.count(), api_calls()),
        (2, 52),
        "no replay, no token request"
    );
    assert!(api.calls.lock().unwrap()[2..]
        .iter()
        .all(|(t, _)| t == "tok-2"));
    for (n, hold) in [1u32, 2, 4, 8, 16, 32, 60, 60].into_iter().enumerate() {
        let before = ep.count();
        let almost = fetched + Duration::from_secs(hold.into()) - Duration::from_millis(100);
        tokio::time::advance(almost - Instant::now()).await;
        assert_eq!(call().await, StatusCode::UNAUTHORIZED);
        assert_eq!(
            ep.count(),
            before,
            "hold {n} ({hold} s): the token is still kept"
        );
        tokio::time::advance(Duration::from_millis(200)).await;
        let calls = api_calls();
        assert_eq!(call().await, StatusCode::UNAUTHORIZED);
        assert_eq!(ep.count(), before + 1, "hold {n} ({hold} s) is over");
        assert_eq!(api_calls(), calls + 2, "a new token is worth a replay");
        fetched = Instant::now() - replay;
    }
    // The API accepts the kept token: it worked, so when it is refused later (revoked) it is
    // replaced at once, and the holds start again from none.
    let current = format!("tok-{}", ep.count());
    api.accept_only(&[&current]);
    assert_eq!(call().await, StatusCode::OK);
    api.accept_only(&["nobody"]);
    let before = ep.count();
    assert_eq!(call().await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        ep.count(),
        before + 1,
        "a revoked token is replaced at once"
    );
    assert_eq!(call().await, StatusCode::UNAUTHORIZED);
    assert_eq!(
        ep.count(),
        before + 2,
        "the first token never accepted: replaced at once"
    );
    assert_eq!(call().await, StatusCode::UNAUTHORIZED);
    assert_eq!(ep.count(), before + 2, "the second in a row: kept for 1 s");
}

#[tokio::test(start_paused = true)]
async fn a_second_401_is_returned_and_403_is_never_retried() {
    let ep = TokenEndpoint::new(3_600);
    let api = Api::default();
    api.valid.lock().unwrap().push("nobody".into());
    let svc = AuthLayer::oauth2(ep.source()).layer(api.service());
    let res = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(api.calls.lock().unwrap().len(), 2);
    assert_eq!(ep.count(), 2);

    let forbidden = service_fn(|_r: Request<Full<Bytes>>| async {
        Ok::<_, BoxError>(Response::builder().status(403).body(()).unwrap())
    });
    let n = Arc::new(AtomicU32::new(0));
    let counted = {
        let n = n.clone();
        tower::ServiceBuilder::new()
            .map_request(move |r| {
                n.fetch_add(1, Ordering::SeqCst);
                r
            })
            .service(forbidden)
    };
    let svc = AuthLayer::oauth2(ep.source()).layer(counted);
    assert_eq!(
        svc.oneshot(get()).await.unwrap().status(),
        StatusCode::FORBIDDEN
    );
    assert_eq!(n.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn client_secret_basic_and_post_are_encoded_per_rfc6749() {
    let ep = TokenEndpoint::new(60);
    ep.source()
        .with_scopes(["orders:read", "orders:write"])
        .with_audience("https://api.example.com")
        .get()
        .await
        .unwrap();
    ep.source()
        .with_client_auth(ClientAuth::SecretPost)
        .get()
        .await
        .unwrap();
    let seen = ep.seen.lock().unwrap();
    // Basic: id and secret form-encoded first ("my client" => "my+client", ":+%" => "%3A%2B%25").
    let basic = seen[0].headers()["authorization"]
        .to_str()
        .unwrap()
        .strip_prefix("Basic ")
        .unwrap();
    use base64::Engine as _;
    let decoded = String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(basic)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(decoded, "my+client:s3cr3t%3A%2B%25");
    assert!(seen[0].headers()["authorization"].is_sensitive());
    assert_eq!(
        seen[0].headers()["content-type"],
        "application/x-www-form-urlencoded"
    );
    let form: Vec<(String, String)> = form_urlencoded::parse(seen[0].body())
        .into_owned()
        .collect();
    assert_eq!(
        form,
        [
            ("grant_type".into(), "client_credentials".into()),
            ("scope".into(), "orders:read orders:write".into()),
            ("audience".into(), "https://api.example.com".into())
        ]
    );
    // Post: in the body, no Authorization.
    assert!(seen[1].headers().get("authorization").is_none());
    let form: Vec<(String, String)> = form_urlencoded::parse(seen[1].body())
        .into_owned()
        .collect();
    assert!(form.contains(&("client_id".into(), "my client".into())));
    assert!(form.contains(&("client_secret".into(), "s3cr3t:+%".into())));
}

#[tokio::test(start_paused = true)]
async fn odd_expires_in_values_are_safe() {
    // Missing: the default lifetime (1 h).
    let ep = TokenEndpoint::new(0);
    *ep.expires_in.lock().unwrap() = serde_json::Value::Null;
    let src = ep.source();
    src.get().await.unwrap();
    tokio::time::advance(Duration::from_secs(3_500)).await;
    src.get().await.unwrap();
    assert_eq!(ep.count(), 1);
    // Zero or negative: a clear error, and no refresh loop.
    for bad in [
        serde_json::json!(0),
        serde_json::json!(-60),
        serde_json::json!("soon"),
    ] {
        let ep = TokenEndpoint::new(0);
        *ep.expires_in.lock().unwrap() = bad.clone();
        let src = ep.source();
        let err = src.get().await.unwrap_err();
        assert!(err.to_string().contains("expires"), "{bad}: {err}");
        for _ in 0..20 {
            let _ = src.get().await;
        }
        assert_eq!(ep.count(), 1, "{bad}: no refresh loop");
    }
    // Absurd: clamped to a day.
    let ep = TokenEndpoint::new(0);
    *ep.expires_in.lock().unwrap() = serde_json::json!(1e15);
    let src = ep.source();
    let t = src.get().await.unwrap();
    let left = t.expires_at().unwrap() - tokio::time::Instant::now();
    assert!(left <= Duration::from_secs(86_400));
}

#[tokio::test(start_paused = true)]
async fn static_credentials() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let api = service_fn(move |req: Request<Full<Bytes>>| {
        s2.lock()
            .unwrap()
            .push((req.uri().clone(), req.headers().clone()));
        async { Ok::<_, BoxError>(Response::new(())) }
    });
    AuthLayer::api_key(http::HeaderName::from_static("x-api-key"), "k-123")
        .unwrap()
        .layer(api.clone())
        .oneshot(get())
        .await
        .unwrap();
    AuthLayer::api_key_query("api_key", "k 123&x")
        .unwrap()
        .layer(api.clone())
        .oneshot(
            Request::get("http://h/p?a=1")
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    AuthLayer::basic("Aladdin", "open sesame")
        .unwrap()
        .layer(api.clone())
        .oneshot(get())
        .await
        .unwrap();
    let seen = seen.lock().unwrap();
    assert_eq!(seen[0].1["x-api-key"], "k-123");
    assert!(seen[0].1["x-api-key"].is_sensitive());
    assert_eq!(seen[1].0, "http://h/p?a=1&api_key=k+123%26x");
    assert_eq!(
        seen[2].1["authorization"],
        "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
    );
    assert!(AuthLayer::basic("a:b", "x").is_err());
    assert!(AuthLayer::bearer("bad\nvalue").is_err());
}

#[test]
fn traits() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    fn assert_send<T: Send>() {}
    type Mock = tower_test::mock::Mock<Request<Full<Bytes>>, Response<()>>;
    assert_send_sync_clone::<AuthLayer>();
    assert_send_sync_clone::<sturdy_auth::Auth<Mock>>();
    assert_send::<sturdy_auth::ResponseFuture<Mock, Full<Bytes>>>();
    assert_send_sync_clone::<ClientCredentials>();
    fn is_source<T: TokenSource>() {}
    is_source::<ClientCredentials>();
}

#[tokio::test(start_paused = true)]
async fn the_trace_records_a_token_refresh_only_when_the_call_waited_for_one() {
    use sturdy_core::{Trace, TraceEvent};
    let ep = TokenEndpoint::new(3_600);
    let svc = AuthLayer::oauth2(ep.source()).layer(Api::accept_all_tokens().service());
    let traced = || {
        let trace = Trace::new();
        let mut req = get();
        req.extensions_mut().insert(trace.clone());
        (trace, req)
    };
    let (cold, req) = traced();
    svc.clone().oneshot(req).await.unwrap();
    assert_eq!(cold.events(), vec![TraceEvent::TokenRefresh]);
    let (cached, req) = traced();
    svc.clone().oneshot(req).await.unwrap();
    assert_eq!(cached.events(), vec![]);
}

/// A body of known size that ends with trailers; `From<Bytes>` (what both sends are rebuilt
/// from) has none.
struct Trailed(Option<Bytes>, Option<http::HeaderMap>);

impl From<Bytes> for Trailed {
    fn from(b: Bytes) -> Self {
        Self(Some(b), None)
    }
}

impl http_body::Body for Trailed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        if let Some(d) = self.0.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(d))));
        }
        std::task::Poll::Ready(self.1.take().map(|t| Ok(http_body::Frame::trailers(t))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// The body kept for the replay after a 401 is rebuilt from its bytes: one with trailers is
/// refused unsent (it went out without them); one of unknown size goes out as it is.
#[tokio::test(start_paused = true)]
async fn a_kept_body_with_trailers_is_refused_unsent_not_sent_without_them() {
    let ep = TokenEndpoint::new(3_600);
    let sent = Arc::new(AtomicU32::new(0));
    let api = {
        let sent = sent.clone();
        service_fn(move |_req: Request<Trailed>| {
            sent.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(Response::new(())) }
        })
    };
    let svc = AuthLayer::oauth2(ep.source()).layer(api);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-checksum", http::HeaderValue::from_static("abc123"));
    let req = Request::put("http://api.example.com/blob")
        .body(Trailed(
            Some(Bytes::from_static(b"payload")),
            Some(trailers),
        ))
        .unwrap();
    let err = svc.clone().oneshot(req).await.unwrap_err();
    let e = sturdy_core::find::<sturdy_core::Error>(&*err).expect("a sturdy error");
    assert_eq!(*e.kind(), ErrorKind::Body);
    assert!(e.to_string().contains("trailers"), "{e}");
    assert_eq!(
        sturdy_core::classify::delivery(&*err),
        sturdy_core::Delivery::NotSent
    );
    assert_eq!(sent.load(Ordering::SeqCst), 0);
    // Empty trailers carry nothing: sent.
    let req = Request::put("http://api.example.com/blob")
        .body(Trailed(
            Some(Bytes::from_static(b"payload")),
            Some(http::HeaderMap::new()),
        ))
        .unwrap();
    svc.oneshot(req).await.unwrap();
    assert_eq!(sent.load(Ordering::SeqCst), 1);
}

/// A body whose size hint says 10 bytes and which yields 1,024 chunks of 4 KiB (4 MiB): one
/// read without a limit ends, and is sent, so the test fails rather than hangs.
struct Lying(u64);

impl From<Bytes> for Lying {
    fn from(_: Bytes) -> Self {
        Self(0)
    }
}

impl http_body::Body for Lying {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0 += 1;
        if self.0 > 1024 {
            return std::task::Poll::Ready(None);
        }
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
            b'x';
            4096
        ])))))
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(10)
    }
}

/// A body kept for the replay whose size hint said it fits but which yields more is refused,
/// not sent, once the replay limit has arrived: it is not read for ever.
#[tokio::test(start_paused = true)]
async fn a_kept_body_larger_than_its_size_hint_is_refused_at_the_replay_limit() {
    let ep = TokenEndpoint::new(3_600);
    let sent = Arc::new(AtomicU32::new(0));
    let api = {
        let sent = sent.clone();
        service_fn(move |_req: Request<Lying>| {
            sent.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, BoxError>(Response::new(())) }
        })
    };
    let svc = AuthLayer::oauth2(ep.source())
        .with_replay_limit(64 * 1024)
        .layer(api);
    let req = Request::post("http://api.example.com/upload")
        .body(Lying(0))
        .unwrap();
    let err = tokio::time::timeout(std::time::Duration::from_secs(5), svc.oneshot(req))
        .await
        .expect("the read stops at the limit")
        .unwrap_err();
    let e = sturdy_core::find::<sturdy_core::Error>(&*err).expect("a sturdy error");
    assert_eq!(*e.kind(), ErrorKind::Body);
    assert!(
        e.to_string().contains("65536 bytes") && e.to_string().contains("not sent"),
        "{e}"
    );
    assert_eq!(
        sturdy_core::classify::delivery(&*err),
        sturdy_core::Delivery::NotSent
    );
    assert_eq!(sent.load(Ordering::SeqCst), 0);
}

/// `with_audience` is a setter (the last one is sent, once); `with_param` adds (a name may
/// repeat, as RFC 8707's `resource` does).
#[tokio::test(start_paused = true)]
async fn a_second_audience_replaces_the_first_and_params_may_repeat() {
    let ep = TokenEndpoint::new(60);
    ep.source()
        .with_param("audience", "https://first.example.com")
        .unwrap()
        .with_audience("https://second.example.com")
        .with_audience("https://api.example.com")
        .with_param("resource", "https://a.example.com")
        .unwrap()
        .with_param("resource", "https://b.example.com")
        .unwrap()
        .get()
        .await
        .unwrap();
    let seen = ep.seen.lock().unwrap();
    let form: Vec<(String, String)> = form_urlencoded::parse(seen[0].body())
        .into_owned()
        .collect();
    assert_eq!(
        form,
        [
            ("grant_type".into(), "client_credentials".into()),
            ("audience".into(), "https://api.example.com".into()),
            ("resource".into(), "https://a.example.com".into()),
            ("resource".into(), "https://b.example.com".into()),
        ]
    );
}
