//! docs/guides/auth.md and sturdy-auth's changelog, read literally: an `expires_in` no double can
//! hold is a huge lifetime clamped to 24 h; a token failure shared by several waiters has its io
//! or hyper cause in each caller's `source()` chain.
#![cfg(feature = "full")]

use crate::outsider_common;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use outsider_common::*;
use sturdy::auth::{AuthLayer, ClientCredentials, ExposeSecret};
use sturdy::core::classify::delivery;
use sturdy::core::{BoxError, Delivery};
use sturdy::ClientBuilder;
use tokio::time::Instant;
use tower::ServiceExt;

const DAY: Duration = Duration::from_secs(86_400);

/// A token endpoint answering `{"access_token":"tok-<n>", "expires_in": <expires>}`.
fn endpoint(
    expires: &'static str,
) -> (
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = std::convert::Infallible,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    Arc<AtomicUsize>,
) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let svc = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        let i = n2.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            Ok(Response::builder()
                .header("content-type", "application/json")
                .body(Full::from(format!(
                    r#"{{"access_token":"tok-{i}","token_type":"Bearer","expires_in":{expires}}}"#
                )))
                .unwrap())
        }
    });
    (svc, n)
}

async fn settle() {
    for _ in 0..20 {
        tokio::task::yield_now().await;
    }
}

/// auth.md: "`expires_in` missing => 1 h, zero or negative => a clear error, huge => 24 h";
/// changelog: "an `expires_in` no double can hold (`1e400`, valid JSON, or the string
/// `"1e400"`) is a huge lifetime, clamped to `with_max_lifetime` (24 h)". The token expires 24 h
/// after it was fetched, is reused until `expiry - 60 s`, and refreshed after.
#[tokio::test(start_paused = true)]
async fn an_expires_in_beyond_a_double_is_clamped_to_24h() {
    for expires in ["1e400", "\"1e400\"", "1E400", "1e308"] {
        let (svc, n) = endpoint(expires);
        let c = ClientCredentials::new(svc, "http://127.0.0.1:9/token", "id", "secret").unwrap();
        let t0 = Instant::now();
        let tok = c
            .get()
            .await
            .unwrap_or_else(|e| panic!("expires_in {expires}: {e}"));
        assert_eq!(tok.secret().expose_secret(), "tok-1");
        let at = tok.expires_at().expect("an expiry");
        assert!(
            at >= t0 + DAY - Duration::from_secs(1) && at <= t0 + DAY,
            "expires_in {expires}: expires after {:?}",
            at - t0
        );
        tokio::time::advance(DAY - Duration::from_secs(61)).await;
        assert_eq!(c.get().await.unwrap().secret().expose_secret(), "tok-1");
        settle().await;
        assert_eq!(
            n.load(Ordering::SeqCst),
            1,
            "expires_in {expires}: refreshed early"
        );
        tokio::time::advance(Duration::from_secs(2)).await;
        let _ = c.get().await.unwrap();
        settle().await;
        assert_eq!(
            n.load(Ordering::SeqCst),
            2,
            "expires_in {expires}: no refresh"
        );
    }
}

/// The clamp is `with_max_lifetime`: with 2 h set, `1e400` lives 2 h.
#[tokio::test(start_paused = true)]
async fn an_expires_in_beyond_a_double_is_clamped_to_with_max_lifetime() {
    let (svc, _) = endpoint("1e400");
    let c = ClientCredentials::new(svc, "http://127.0.0.1:9/token", "id", "secret")
        .unwrap()
        .with_max_lifetime(Duration::from_secs(7_200));
    let t0 = Instant::now();
    let tok = c.get().await.unwrap_or_else(|e| panic!("{e}"));
    let at = tok.expires_at().expect("an expiry");
    assert!(
        at <= t0 + Duration::from_secs(7_200) && at >= t0 + Duration::from_secs(7_199),
        "{:?}",
        at - t0
    );
}

/// auth.md: "zero or negative => a clear error": `-1e400` (negative, beyond a double) is a clear
/// error about the expiry, not a token that lives 24 h, and no panic.
#[tokio::test(start_paused = true)]
async fn a_negative_expires_in_beyond_a_double_is_a_clear_error() {
    for expires in ["-1e400", "\"-1e400\""] {
        let (svc, _) = endpoint(expires);
        let c = ClientCredentials::new(svc, "http://127.0.0.1:9/token", "id", "secret").unwrap();
        let e = c.get().await.unwrap_err();
        let m = e.to_string();
        assert!(m.contains("expire"), "expires_in {expires}: {m}");
        assert!(!m.contains("tok-1"), "{m}");
    }
}

/// A token endpoint whose every request fails, after 100 ms, with an io error.
fn failing_endpoint() -> (
    impl tower::Service<
            Request<Full<Bytes>>,
            Response = Response<Full<Bytes>>,
            Error = std::io::Error,
            Future = impl Send,
        > + Clone
        + Send
        + 'static,
    Arc<AtomicUsize>,
) {
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let svc = tower::service_fn(move |_req: Request<Full<Bytes>>| {
        n2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Err::<Response<Full<Bytes>>, _>(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "token endpoint refused the connection",
            ))
        }
    });
    (svc, n)
}

fn chain_has_io(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(err);
    while let Some(e) = cur {
        if e.downcast_ref::<std::io::Error>().is_some() {
            return true;
        }
        cur = e.source();
    }
    false
}

/// auth.md "Errors": "Each caller gets its own error; the cause several waiters share (an io or
/// hyper error, for instance) is its `source()`"; changelog: "the io or hyper error under it is
/// in the chain, so `sturdy_core::find::<io::Error>` and a walk of `source()` reach it". Three
/// callers of `ClientCredentials::get` share one failed request.
#[tokio::test(start_paused = true)]
async fn a_shared_io_failure_is_in_every_waiters_chain() {
    let (svc, n) = failing_endpoint();
    let c = ClientCredentials::new(svc, "http://127.0.0.1:9/token", "id", "secret").unwrap();
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.get().await })
        })
        .collect();
    for w in waiters {
        let e = w.await.unwrap().unwrap_err();
        let chain = chain(&e);
        assert!(
            sturdy::core::find::<std::io::Error>(&e).is_some(),
            "find misses the io error: {chain:?}"
        );
        assert!(chain_has_io(&e), "{chain:?}");
        assert!(
            chain
                .iter()
                .any(|m| m.contains("token endpoint refused the connection")),
            "{chain:?}"
        );
    }
    assert_eq!(n.load(Ordering::SeqCst), 1, "one request for the three");
}

/// The same through the composed client: each of three calls waiting for the first token gets
/// an error whose chain reaches the io error, says `NotSent`, and nothing reached the API.
#[tokio::test(start_paused = true)]
async fn a_shared_io_failure_is_in_every_calls_chain_through_the_client() {
    let api = Api::new(vec![], ok());
    let (svc, _) = failing_endpoint();
    let c = ClientCredentials::new(svc, "http://127.0.0.1:9/token", "id", "secret").unwrap();
    let client = ClientBuilder::new()
        .without_retry()
        .with_auth(AuthLayer::oauth2(c))
        .build(api.service());
    let calls: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(
                client
                    .clone()
                    .oneshot(get(&format!("http://api.example.com/{i}"))),
            )
        })
        .collect();
    for call in calls {
        let err: BoxError = call.await.unwrap().unwrap_err();
        assert!(
            sturdy::core::find::<std::io::Error>(&*err).is_some(),
            "{:?}",
            chain(&*err)
        );
        assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
    }
    assert_eq!(api.calls(), 0);
}

/// The hyper side of the same sentence, over a real hyper-util client: a token endpoint on
/// 127.0.0.1 that accepts and closes each connection without answering. Every waiter's chain
/// holds the `hyper::Error`.
#[tokio::test]
async fn a_shared_hyper_failure_is_in_every_waiters_chain() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut sock, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await;
                tokio::time::sleep(Duration::from_millis(150)).await;
                drop(sock);
            });
        }
    });
    let http = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let c = ClientCredentials::new(http, &format!("http://{addr}/token"), "id", "secret").unwrap();
    let waiters: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.get().await })
        })
        .collect();
    for w in waiters {
        let e = w.await.unwrap().unwrap_err();
        assert!(
            sturdy::core::find::<hyper::Error>(&e).is_some(),
            "{:?}",
            chain(&e)
        );
    }
}

/// Hostile lifetimes a string may carry that a float parser reads: `"NaN"`, `"inf"`,
/// `"-inf"`. auth.md: "zero or negative => a clear error, huge => 24 h": never a panic, and
/// never a token that outlives 24 h; `-inf` is a clear error.
#[tokio::test(start_paused = true)]
async fn nan_and_infinite_lifetimes_never_panic_nor_outlive_24h() {
    for expires in [
        "\"NaN\"",
        "\"inf\"",
        "\"infinity\"",
        "\"-inf\"",
        "\"1e400 \"",
    ] {
        let (svc, _) = endpoint(expires);
        let c = ClientCredentials::new(svc, "http://127.0.0.1:9/token", "id", "secret").unwrap();
        let t0 = Instant::now();
        let got = tokio::spawn(async move { c.get().await })
            .await
            .unwrap_or_else(|e| panic!("expires_in {expires}: the task failed: {e}"));
        match got {
            Ok(tok) => {
                assert_ne!(expires, "\"-inf\"", "a negative lifetime gave a token");
                let at = tok.expires_at().expect("an expiry");
                assert!(at <= t0 + DAY, "expires_in {expires}: {:?}", at - t0);
            }
            Err(e) => {
                let m = e.to_string();
                assert!(!m.contains("tok-1"), "{m}");
            }
        }
    }
}

/// RELIABILITY.md: "durations set to `Duration::MAX` (deadlines, timeouts, open periods, hedge
/// delays) | read as about 30 years from now; never a panic | each setter". A
/// `with_max_lifetime(Duration::MAX)` meets an `expires_in` of `1e400` (clamped to the maximum
/// lifetime): a token, no panic, its expiry in the future.
#[tokio::test(start_paused = true)]
async fn a_1e400_lifetime_under_a_duration_max_maximum_never_panics() {
    for expires in ["1e400", "\"1e400\"", "1e15"] {
        let (svc, _) = endpoint(expires);
        let c = ClientCredentials::new(svc, "http://127.0.0.1:9/token", "id", "secret")
            .unwrap()
            .with_max_lifetime(Duration::MAX);
        let t0 = Instant::now();
        let got = tokio::spawn(async move { c.get().await })
            .await
            .unwrap_or_else(|e| panic!("expires_in {expires}: the task failed: {e}"));
        let tok = got.unwrap_or_else(|e| panic!("expires_in {expires}: {e}"));
        if let Some(at) = tok.expires_at() {
            assert!(at > t0 + DAY, "expires_in {expires}: {:?}", at - t0);
        }
    }
}
