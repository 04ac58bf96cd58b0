//! The auth guide's words on deadlines and attempts, and the idempotency guide's words on 409
//! with `Retry-After`, read literally: the first token's wait under an overall deadline, a failed
//! token wait for the replay after a 401, token failures not held against the API host, the
//! token wait bounded by the attempt timeout, and which 409s the retry layer asks again.
//! Paused time over in-process services.
#![cfg(feature = "full")]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::core::{CallOptions, Delivery};
use sturdy::ClientBuilder;
use tower::{ServiceBuilder, ServiceExt};

type Api = tower::util::BoxCloneSyncService<
    Request<Full<Bytes>>,
    Response<Full<Bytes>>,
    sturdy::core::BoxError,
>;

/// An API answering `status(n)` (with optional `Retry-After`) to its n-th call (from 0).
fn api(
    f: impl Fn(usize) -> (u16, Option<&'static str>) + Send + Sync + 'static,
) -> (Api, Arc<AtomicUsize>) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let f = Arc::new(f);
    let svc = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst);
        let (status, ra) = f(i);
        async move {
            let mut b = Response::builder().status(status);
            if let Some(ra) = ra {
                b = b.header("retry-after", ra);
            }
            Ok::<_, sturdy::core::BoxError>(b.body(Full::<Bytes>::default()).unwrap())
        }
    });
    (tower::util::BoxCloneSyncService::new(svc), n)
}

/// A token endpoint that answers after `delay`, with `answer(n)`.
fn tokens(
    delay: Duration,
    answer: impl Fn(usize) -> (u16, String) + Send + Sync + 'static,
) -> ClientCredentials {
    let n = Arc::new(AtomicUsize::new(0));
    let answer = Arc::new(answer);
    let ep = tower::service_fn(move |_r: Request<Full<Bytes>>| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        let (s, b) = answer(i);
        async move {
            tokio::time::sleep(delay).await;
            Ok::<_, std::convert::Infallible>(
                Response::builder()
                    .status(s)
                    .body(Full::new(Bytes::from(b)))
                    .unwrap(),
            )
        }
    });
    ClientCredentials::new(ep, "https://auth.example.com/oauth/token", "id", "secret").unwrap()
}

fn ok_token(i: usize) -> (u16, String) {
    (
        200,
        format!(r#"{{"access_token":"t{i}","expires_in":3600}}"#),
    )
}

/// "So does a call whose overall deadline (`CallOptions::with_deadline`) ends while it waits for
/// its first token, in a `ClientBuilder` stack ...: "the overall deadline of 200ms passed while
/// attempt 1 waited for an access token, before it was sent"".
#[tokio::test(start_paused = true)]
async fn deadline_while_waiting_for_the_first_token() {
    let (svc, calls) = api(|_| (201, None));
    let client = ClientBuilder::new()
        .with_auth(AuthLayer::oauth2(tokens(Duration::from_secs(5), ok_token)))
        .build(svc);
    let mut req = Request::post("http://api.test/orders")
        .body(Full::from("x"))
        .unwrap();
    req.extensions_mut()
        .insert(CallOptions::new().with_deadline(Duration::from_millis(200)));
    let t0 = tokio::time::Instant::now();
    let err = client.oneshot(req).await.unwrap_err();
    assert_eq!(tokio::time::Instant::now() - t0, Duration::from_millis(200));
    let m = err.to_string();
    assert!(
        m.contains("the overall deadline of 200ms passed while attempt 1 waited for an access token, before it was sent"),
        "{m}"
    );
    assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

/// "After a 401, a failed token wait for the replay is different: the API saw the first attempt
/// and answered it, so the error says `Delivery::MaybeProcessed`, whatever the token endpoint's
/// failure was." "The error is also marked as not the API's failure (`Error::cause_is_elsewhere`)".
#[tokio::test(start_paused = true)]
async fn failed_token_for_the_replay_after_401() {
    let (svc, calls) = api(|_| (401, None));
    let src = tokens(Duration::ZERO, |i| {
        if i == 0 {
            ok_token(0)
        } else {
            (401, r#"{"error":"invalid_client"}"#.to_owned())
        }
    });
    let err = ServiceBuilder::new()
        .layer(AuthLayer::oauth2(src))
        .service(svc)
        .oneshot(
            Request::post("http://api.test/orders")
                .body(Full::from("x"))
                .unwrap(),
        )
        .await
        .unwrap_err();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(
        sturdy::core::classify::delivery(&*err),
        Delivery::MaybeProcessed,
        "{err}"
    );
    let e = sturdy::core::find::<sturdy::core::Error>(&*err).unwrap();
    assert!(e.cause_is_elsewhere(), "{e}");
    assert!(
        !sturdy::core::classify::concerns_destination(&*err),
        "{err}"
    );
}

/// "The wait for a token is part of an attempt: it ends at the shorter of the token timeout and
/// the attempt timeout (`AuthLayer::with_attempt_timeout` ..., or the request's
/// `CallOptions::with_attempt_timeout`)."
#[tokio::test(start_paused = true)]
async fn token_wait_bounded_by_the_attempt_timeout() {
    for (layer_attempt, request_attempt, expect) in [
        (Some(Duration::from_secs(1)), None, Duration::from_secs(1)),
        (
            None,
            Some(Duration::from_millis(500)),
            Duration::from_millis(500),
        ),
        (
            Some(Duration::from_secs(1)),
            Some(Duration::from_millis(300)),
            Duration::from_millis(300),
        ),
        (Some(Duration::from_secs(60)), None, Duration::from_secs(2)),
    ] {
        let (svc, calls) = api(|_| (200, None));
        let mut layer = AuthLayer::oauth2(tokens(Duration::from_secs(100), ok_token))
            .with_token_timeout(Duration::from_secs(2));
        if let Some(d) = layer_attempt {
            layer = layer.with_attempt_timeout(d);
        }
        let mut req = Request::get("http://api.test/x")
            .body(Full::default())
            .unwrap();
        if let Some(d) = request_attempt {
            req.extensions_mut()
                .insert(CallOptions::new().with_attempt_timeout(d));
        }
        let t0 = tokio::time::Instant::now();
        let err = ServiceBuilder::new()
            .layer(layer)
            .service(svc)
            .oneshot(req)
            .await
            .unwrap_err();
        assert_eq!(
            tokio::time::Instant::now() - t0,
            expect,
            "{layer_attempt:?} {request_attempt:?}: {err}"
        );
        assert_eq!(sturdy::core::classify::delivery(&*err), Delivery::NotSent);
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}

/// "When the server answers 409 with `Retry-After` to a request that carries a key ..., the
/// retry layer waits and asks again, so the caller gets the stored response. A 409 without
/// `Retry-After`, or to a request without a key, is a real conflict and is returned as it is."
#[tokio::test(start_paused = true)]
async fn which_409s_are_asked_again() {
    // Keyed POST, 409 + Retry-After: asked again after at least 1 s.
    let (svc, calls) = api(|i| {
        if i == 0 {
            (409, Some("1"))
        } else {
            (201, None)
        }
    });
    let client = ClientBuilder::new().build(svc);
    let t0 = tokio::time::Instant::now();
    let res = client
        .oneshot(
            Request::post("http://api.test/orders")
                .body(Full::from("x"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CREATED);
    assert!(tokio::time::Instant::now() - t0 >= Duration::from_secs(1));
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // Keyed POST, 409 without Retry-After: returned as is.
    let (svc, calls) = api(|_| (409, None));
    let res = ClientBuilder::new()
        .build(svc)
        .oneshot(
            Request::post("http://api.test/orders")
                .body(Full::from("x"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::CONFLICT);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // No key (a GET, a POST of a client without the key layer): returned as is.
    for (method, keyed) in [("GET", true), ("PUT", true), ("POST", false)] {
        let (svc, calls) = api(|_| (409, Some("1")));
        let client = if keyed {
            ClientBuilder::new().build(svc)
        } else {
            ClientBuilder::new().without_idempotency().build(svc)
        };
        let res = client
            .oneshot(
                Request::builder()
                    .method(method)
                    .uri("http://api.test/o")
                    .body(Full::from("x"))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::CONFLICT, "{method}");
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "{method} without a key was asked again"
        );
    }
}
