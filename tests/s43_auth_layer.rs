//! The auth layer with a token source, per docs/guides/auth.md ("401 from the API", "Bounded
//! waits", "Where it sits", "Errors") and the rustdoc of `sturdy_auth` (`AuthLayer`, `Auth`):
//! the 401 refetch and single replay, 403 as is, the token timeout and its words, delivery
//! marks, custom sources, and composition under `Buffer` and `ConcurrencyLimit(1)` with a kept
//! service driven by `ready().await?.call(req)`, on paused time.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use sturdy::auth::{AuthLayer, BoxFuture, Token, TokenSource};
use sturdy::core::{BoxError, Delivery, ErrorKind, ErrorSummary};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder, ServiceExt};

use crate::s43_util::{
    get, own, post, source, status_json, token_json, Answer, Api, Endpoint, TOKEN_URL,
};

const API: &str = "https://api.example.com/v1/orders";

fn token_after(d: Duration, t: &str) -> Answer {
    Answer::After(
        d,
        200,
        format!(r#"{{"access_token":"{t}","token_type":"Bearer","expires_in":3600}}"#).into(),
    )
}

#[tokio::test(start_paused = true)]
async fn a_401_invalidates_the_token_fetches_a_new_one_and_replays_once() {
    let ep = Endpoint::new(token_json("t-2", Some("3600")));
    ep.then(token_json("t-1", Some("3600")));
    let api = Api::default();
    api.statuses.lock().unwrap().extend([401]);
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(source(&ep)))
        .service(api.service());
    let res = svc.oneshot(get(API)).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(api.seen(), ["Bearer t-1", "Bearer t-2"]);
    assert_eq!(ep.count(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_second_401_is_returned_as_is_and_a_403_is_never_retried() {
    let ep = Endpoint::new(token_json("t-n", Some("3600")));
    let api = Api::default();
    *api.always.lock().unwrap() = Some(401);
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(source(&ep)))
        .service(api.service());
    let res = svc.clone().oneshot(get(API)).await.unwrap();
    assert_eq!(res.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(api.seen().len(), 2);
    assert_eq!(ep.count(), 2);

    *api.always.lock().unwrap() = Some(403);
    let res = svc.oneshot(get(API)).await.unwrap();
    assert_eq!(res.status(), StatusCode::FORBIDDEN);
    assert_eq!(api.seen().len(), 3, "a 403 was replayed");
    assert_eq!(ep.count(), 2, "a 403 refetched the token");
}

#[tokio::test(start_paused = true)]
async fn ten_callers_refused_with_401_together_share_one_refetch() {
    let ep = Endpoint::new(token_after(Duration::from_millis(300), "t-2"));
    ep.then(token_json("t-1", Some("3600")));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let api = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let log = log.clone();
        async move {
            let auth = req.headers()["authorization"].to_str().unwrap().to_owned();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let status = if auth == "Bearer t-1" { 401 } else { 200 };
            log.lock().unwrap().push(auth);
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(source(&ep)))
        .service(api);
    let calls: Vec<_> = (0..10)
        .map(|_| tokio::spawn(svc.clone().oneshot(get(API))))
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap().unwrap().status(), StatusCode::OK);
    }
    assert_eq!(ep.count(), 2, "one refetch for all the 401s");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.iter().filter(|a| *a == "Bearer t-2").count(), 10);
}

#[tokio::test(start_paused = true)]
async fn the_replay_after_a_401_sends_the_same_post_body() {
    let ep = Endpoint::new(token_json("t-2", Some("3600")));
    ep.then(token_json("t-1", Some("3600")));
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let log = bodies.clone();
    let n = Arc::new(AtomicUsize::new(0));
    let api = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let log = log.clone();
        let n = n.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            log.lock().unwrap().push(body);
            let status = if n.fetch_add(1, Ordering::SeqCst) == 0 {
                401
            } else {
                201
            };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(source(&ep)))
        .service(api);
    let res = svc.oneshot(post(API, r#"{"qty":3}"#)).await.unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    let bodies = bodies.lock().unwrap();
    assert_eq!(bodies.len(), 2);
    assert_eq!(bodies[0], bodies[1]);
    assert_eq!(&bodies[1][..], br#"{"qty":3}"#);
}

#[tokio::test(start_paused = true)]
async fn a_token_wait_ends_at_the_token_timeout_with_the_guides_words() {
    let ep = Endpoint::new(Answer::Stall);
    let layer = AuthLayer::oauth2(source(&ep).with_request_timeout(Duration::from_secs(100)))
        .with_token_timeout(Duration::from_secs(2));
    assert_eq!(layer.token_timeout(), Duration::from_secs(2));
    let api = Api::default();
    let svc = ServiceBuilder::new().layer(layer).service(api.service());
    let start = Instant::now();
    let err = svc.oneshot(post(API, "{}")).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(2));
    let e = own(&err);
    assert_eq!(*e.kind(), ErrorKind::Timeout);
    assert!(e.is_retryable());
    assert_eq!(e.delivery(), Some(Delivery::NotSent));
    assert!(e.cause_is_elsewhere());
    assert!(
        err.to_string().starts_with(&format!(
            "no access token from the token endpoint {TOKEN_URL} within 2s; the request was not sent. Retryable: "
        )),
        "{err}"
    );
    assert!(!ErrorSummary::of(&*err).may_have_been_processed);
    assert!(api.seen().is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_default_token_timeout_is_30_seconds() {
    let ep = Endpoint::new(Answer::Stall);
    let layer = AuthLayer::oauth2(source(&ep).with_request_timeout(Duration::from_secs(100)));
    assert_eq!(layer.token_timeout(), Duration::from_secs(30));
    let svc = ServiceBuilder::new()
        .layer(layer)
        .service(Api::default().service());
    let start = Instant::now();
    let err = svc.oneshot(get(API)).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::from_secs(30), "{err}");
    assert_eq!(*own(&err).kind(), ErrorKind::Timeout);
}

#[tokio::test(start_paused = true)]
async fn a_zero_token_timeout_means_the_cached_token_or_fail_at_once() {
    let ep = Endpoint::new(token_after(Duration::from_secs(1), "t-1"));
    let src = source(&ep);
    let api = Api::default();
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(src.clone()).with_token_timeout(Duration::ZERO))
        .service(api.service());
    let first = svc.clone().oneshot(get(API)).now_or_never();
    let err = first.expect("a zero token timeout waited").unwrap_err();
    assert_eq!(*own(&err).kind(), ErrorKind::Timeout);
    // The request goes on; once cached, the token is used without a wait.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let res = svc
        .oneshot(get(API))
        .now_or_never()
        .expect("waited for a cached token");
    assert_eq!(res.unwrap().status(), StatusCode::OK);
    assert_eq!(ep.count(), 1);
    assert_eq!(api.seen(), ["Bearer t-1"]);
}

#[tokio::test(start_paused = true)]
async fn a_caller_arriving_after_a_timed_out_wait_shares_the_same_request() {
    let ep = Endpoint::new(token_after(Duration::from_secs(10), "t-1"));
    let src = source(&ep);
    let short = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(src.clone()).with_token_timeout(Duration::from_secs(2)))
        .service(Api::default().service());
    assert!(short.oneshot(get(API)).await.is_err());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let long = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(src))
        .service(Api::default().service());
    let start = Instant::now();
    assert_eq!(
        long.oneshot(get(API)).await.unwrap().status(),
        StatusCode::OK
    );
    assert_eq!(start.elapsed(), Duration::from_secs(7));
    assert_eq!(ep.count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_503_from_the_token_endpoint_keeps_its_kind_and_is_not_the_apis_failure() {
    let ep = Endpoint::new(status_json(503, "busy"));
    let api = Api::default();
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(source(&ep)))
        .service(api.service());
    let err = svc.oneshot(post(API, "{}")).await.unwrap_err();
    let e = own(&err);
    assert_eq!(
        *e.kind(),
        ErrorKind::Server(StatusCode::SERVICE_UNAVAILABLE)
    );
    assert!(e.is_retryable());
    assert!(e.cause_is_elsewhere());
    assert_eq!(e.delivery(), Some(Delivery::NotSent));
    assert!(err.to_string().contains(TOKEN_URL), "{err}");
    let s = ErrorSummary::of(&*err);
    assert_eq!(
        (s.kind, s.status, s.may_have_been_processed),
        ("server_error", Some(503), false)
    );
    assert!(api.seen().is_empty());
}

#[tokio::test(start_paused = true)]
async fn a_failed_token_wait_for_the_replay_after_a_401_may_have_been_processed() {
    let ep = Endpoint::new(status_json(500, "down"));
    ep.then(token_json("t-1", Some("3600")));
    let api = Api::default();
    api.statuses.lock().unwrap().extend([401]);
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(source(&ep)))
        .service(api.service());
    let err = svc.oneshot(post(API, "{}")).await.unwrap_err();
    let e = own(&err);
    assert_eq!(e.delivery(), Some(Delivery::MaybeProcessed), "{err}");
    assert!(e.cause_is_elsewhere());
    assert!(ErrorSummary::of(&*err).may_have_been_processed);
}

#[derive(Debug)]
struct Failing;

impl TokenSource for Failing {
    fn token(&self) -> BoxFuture<Result<Token, BoxError>> {
        Box::pin(async { Err::<Token, BoxError>(Box::new(std::io::Error::other("vault sealed"))) })
    }

    fn invalidate(&self, _token: &Token) {}
}

#[tokio::test(start_paused = true)]
async fn an_error_of_a_custom_source_is_wrapped_with_the_sources_description() {
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::token_source(Arc::new(Failing)))
        .service(Api::default().service());
    let err = svc.oneshot(get(API)).await.unwrap_err();
    let e = own(&err);
    assert_eq!(e.delivery(), Some(Delivery::NotSent));
    assert!(
        err.to_string()
            .starts_with("could not get an access token from the token source: "),
        "{err}"
    );
    assert!(err.to_string().contains("vault sealed"), "{err}");
}

/// `Buffer` over `Auth` over `ConcurrencyLimit(1)`, driven through a kept service.
#[tokio::test(start_paused = true)]
async fn under_buffer_over_a_limit_of_one_kept_services_all_get_through() {
    let ep = Endpoint::new(token_after(Duration::from_secs(1), "t-1"));
    let api = Api::default();
    *api.delay.lock().unwrap() = Duration::from_millis(100);
    let svc = ServiceBuilder::new()
        .buffer(4)
        .layer(AuthLayer::oauth2(source(&ep)))
        .concurrency_limit(1)
        .service(api.service());
    let tasks: Vec<_> = (0..6)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                let mut codes = Vec::new();
                for _ in 0..3 {
                    let res = svc.ready().await?.call(get(API)).await?;
                    codes.push(res.status().as_u16());
                }
                Ok::<_, BoxError>(codes)
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), [200, 200, 200]);
    }
    assert_eq!(api.seen().len(), 18);
    assert_eq!(api.peak.load(Ordering::SeqCst), 1);
    assert_eq!(ep.count(), 1);
}

/// `Auth` over `Buffer` over `ConcurrencyLimit(1)`, with 401s to replay.
#[tokio::test(start_paused = true)]
async fn over_buffer_and_a_limit_of_one_401_replays_go_through() {
    let ep = Endpoint::new(token_after(Duration::from_millis(500), "t-n"));
    let api = Api::default();
    *api.delay.lock().unwrap() = Duration::from_millis(50);
    api.statuses.lock().unwrap().extend([401, 200, 401, 200]);
    // Boxed (as a session client would be), which also shows the stack is Send + Sync.
    let svc = tower::util::BoxCloneSyncService::new(
        ServiceBuilder::new()
            .layer(AuthLayer::oauth2(source(&ep)))
            .buffer(2)
            .concurrency_limit(1)
            .service(api.service()),
    );
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move { svc.ready().await?.call(get(API)).await })
        })
        .collect();
    for t in tasks {
        let res = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("wedged")
            .unwrap()
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }
    assert_eq!(api.peak.load(Ordering::SeqCst), 1);
}

/// A call waiting for a token holds the permit of the `ConcurrencyLimit(1)` under the layer;
/// dropping the call frees it, and the API never sees the dropped call.
#[tokio::test(start_paused = true)]
async fn a_call_waiting_for_a_token_holds_its_permit_until_dropped() {
    let ep = Endpoint::new(token_after(Duration::from_secs(5), "t-1"));
    let (mock, mut handle) =
        tower_test::mock::pair::<Request<Full<Bytes>>, Response<Full<Bytes>>>();
    let mut svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(source(&ep)))
        .concurrency_limit(1)
        .service(mock);
    svc.ready().await.unwrap();
    let mut first = tokio_test::task::spawn(svc.call(get(API)));
    tokio_test::assert_pending!(first.poll());
    let mut other = svc.clone();
    let mut ready = tokio_test::task::spawn(async move { other.ready().await.map(|_| ()) });
    tokio_test::assert_pending!(ready.poll());
    tokio::time::sleep(Duration::from_secs(1)).await;
    tokio_test::assert_pending!(ready.poll());
    drop(first);
    assert!(ready.is_woken());
    tokio_test::assert_ready_ok!(ready.poll());
    // The dropped call never reached the API.
    assert!(handle.next_request().now_or_never().is_none());
}

/// The same with the token timeout: the permit is held at most that long.
#[tokio::test(start_paused = true)]
async fn a_token_wait_holds_the_permit_at_most_the_token_timeout() {
    let ep = Endpoint::new(Answer::Stall);
    let api = Api::default();
    let svc = ServiceBuilder::new()
        .layer(
            AuthLayer::oauth2(source(&ep).with_request_timeout(Duration::from_secs(600)))
                .with_token_timeout(Duration::from_secs(3)),
        )
        .concurrency_limit(1)
        .service(api.service());
    let start = Instant::now();
    let a = tokio::spawn(svc.clone().oneshot(get(API)));
    let b = tokio::spawn(svc.oneshot(get(API)));
    assert!(a.await.unwrap().is_err());
    assert!(b.await.unwrap().is_err());
    // The second waited for the first's permit (3 s) and then for its own token wait (3 s).
    assert_eq!(start.elapsed(), Duration::from_secs(6));
}

#[test]
fn the_composed_types_are_send_and_sync() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    type Inner =
        tower::util::BoxCloneSyncService<Request<Full<Bytes>>, Response<Full<Bytes>>, BoxError>;
    send_sync::<AuthLayer>();
    send_sync::<sturdy::auth::ClientCredentials>();
    send_sync::<sturdy::auth::Auth<Inner>>();
    send::<sturdy::auth::ResponseFuture<Inner, Full<Bytes>>>();
    send_sync::<
        tower::buffer::Buffer<
            Request<Full<Bytes>>,
            <sturdy::auth::Auth<Inner> as Service<Request<Full<Bytes>>>>::Future,
        >,
    >();
}

/// An API answering 401 to the first call and 200 after, counting calls and body sizes.
fn first_401() -> (
    Arc<Mutex<Vec<usize>>>,
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + Sync,
) {
    let sizes = Arc::new(Mutex::new(Vec::new()));
    let log = sizes.clone();
    let svc = tower::service_fn(move |req: Request<Full<Bytes>>| {
        let log = log.clone();
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let first = {
                let mut l = log.lock().unwrap();
                l.push(body.len());
                l.len() == 1
            };
            let status = if first { 401 } else { 200 };
            Ok::<_, Infallible>(
                Response::builder()
                    .status(status)
                    .body(Full::<Bytes>::default())
                    .unwrap(),
            )
        }
    });
    (sizes, svc)
}

#[tokio::test(start_paused = true)]
async fn a_body_up_to_the_replay_limit_is_replayed_and_a_larger_one_sent_once() {
    for (limit, size, replayed) in [
        (None, 1 << 20, true),
        (None, (1 << 20) + 1, false),
        (Some(10), 10, true),
        (Some(10), 11, false),
        (Some(0), 0, true),
    ] {
        let ep = Endpoint::new(token_json("t-2", Some("3600")));
        ep.then(token_json("t-1", Some("3600")));
        let (sizes, api) = first_401();
        let mut layer = AuthLayer::oauth2(source(&ep));
        if let Some(l) = limit {
            layer = layer.with_replay_limit(l);
        }
        let svc = ServiceBuilder::new().layer(layer).service(api);
        let req = Request::post(API)
            .body(Full::from(vec![b'x'; size]))
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        let what = format!("limit {limit:?}, body {size}");
        if replayed {
            assert_eq!(res.status(), StatusCode::OK, "{what}");
            assert_eq!(*sizes.lock().unwrap(), [size, size], "{what}");
        } else {
            assert_eq!(res.status(), StatusCode::UNAUTHORIZED, "{what}");
            assert_eq!(sizes.lock().unwrap().len(), 1, "{what}");
            // The refused token was still invalidated: the next call has a fresh one.
            svc.oneshot(get(API)).await.unwrap();
            assert_eq!(ep.count(), 2, "{what}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_access_token_that_cannot_go_in_a_header_is_not_kept() {
    let ep = Endpoint::new(token_json("good", Some("3600")));
    ep.then(token_json("bad\\u0001token", Some("3600")));
    let api = Api::default();
    let svc = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(source(&ep)))
        .service(api.service());
    let err = svc.clone().oneshot(get(API)).await.unwrap_err();
    assert_eq!(*own(&err).kind(), ErrorKind::Auth, "{err}");
    assert_eq!(own(&err).delivery(), Some(Delivery::NotSent));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let res = svc.oneshot(get(API)).await;
    assert!(
        res.is_ok(),
        "the unusable token is still used: {:?}",
        res.err()
    );
}
