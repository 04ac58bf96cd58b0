//! OAuth2 client credentials: hostile `expires_in` values (beyond a double, negative, strings,
//! special floats) and the source chains of shared token failures, alone and under the retry
//! layer, `Buffer` and concurrency limits.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use sturdy::auth::{AuthLayer, ClientCredentials};
use sturdy::core::classify::delivery;
use sturdy::core::{find, BoxError, Delivery, Error, ErrorKind};
use sturdy::retry::RetryLayer;
use tokio::time::Instant;
use tower::{service_fn, Service, ServiceBuilder, ServiceExt};

type Req = Request<Full<Bytes>>;

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(86_400);

/// A token endpoint answering `body` with 200 to every request, counting them.
fn endpoint(body: String, calls: Arc<AtomicU32>) -> ClientCredentials {
    let body = Bytes::from(body);
    let svc = service_fn(move |_req: Req| {
        calls.fetch_add(1, Ordering::SeqCst);
        let body = body.clone();
        async move {
            Ok::<_, BoxError>(
                Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/json")
                    .body(Full::new(body))
                    .unwrap(),
            )
        }
    });
    ClientCredentials::new(
        svc,
        "https://auth.example.com/oauth/token",
        "id-21",
        "secret-21-xyz",
    )
    .unwrap()
}

fn token_body(expires_in: &str) -> String {
    format!(r#"{{"access_token":"tok-21","token_type":"Bearer","expires_in":{expires_in}}}"#)
}

async fn lifetime_of(expires_in: &str) -> (Result<Duration, Error>, u32) {
    let calls = Arc::new(AtomicU32::new(0));
    let cc = endpoint(token_body(expires_in), calls.clone());
    let start = Instant::now();
    let out = cc
        .get()
        .await
        .map(|t| t.expires_at().expect("an expiry") - start);
    (out, calls.load(Ordering::SeqCst))
}

/// Absurd lifetimes, as numbers no double holds or as strings, are clamped to 24 h.
#[tokio::test(start_paused = true)]
async fn words21_huge_expires_in_clamped_to_a_day() {
    for e in [
        "1e400",
        "\"1e400\"",
        "18446744073709551616",
        "1.7976931348623157e308",
        "1e19",
        "99999999999999999999999999999999999999999999",
        "1E999999999",
        "\"18446744073709551616\"",
    ] {
        let (out, _) = lifetime_of(e).await;
        let life = out.unwrap_or_else(|err| panic!("expires_in {e}: {err}"));
        assert!(
            life <= DAY && life >= DAY - Duration::from_secs(1),
            "{e}: {life:?}"
        );
    }
    // A 60,000-digit number (within the 64 KiB body bound) too.
    let digits = format!("1{}", "0".repeat(60_000));
    let (out, _) = lifetime_of(&digits).await;
    assert!(out.unwrap() <= DAY);
}

/// Ordinary values are kept: numbers, numeric strings, fractions.
#[tokio::test(start_paused = true)]
async fn words21_ordinary_expires_in_kept() {
    for (e, want) in [
        ("3600", HOUR),
        ("\"3600\"", HOUR),
        ("7200.0", Duration::from_secs(7200)),
        ("36e2", HOUR),
        ("123456789e-5", Duration::from_secs_f64(1234.56789)),
    ] {
        let (out, _) = lifetime_of(e).await;
        let life = out.unwrap_or_else(|err| panic!("expires_in {e}: {err}"));
        let diff = life.abs_diff(want);
        assert!(diff <= Duration::from_secs(1), "{e}: {life:?}");
    }
}

/// Zero, negative (also beyond a double) or not a number: a clear error, no token, and no
/// refresh loop (a second `get` right after does not hammer the endpoint).
#[tokio::test(start_paused = true)]
async fn words21_zero_negative_and_nonsense_expires_in_are_errors() {
    for e in [
        "0",
        "-0",
        "0.0",
        "-1",
        "-1e400",
        "\"-1e400\"",
        "-18446744073709551616",
        "\"0\"",
        "\"soon\"",
        "true",
        "[]",
        "{}",
        "\"NaN\"",
        "\"nan\"",
        "\"-inf\"",
        "\"-Infinity\"",
    ] {
        let calls = Arc::new(AtomicU32::new(0));
        let cc = endpoint(token_body(e), calls.clone());
        let out = cc.get().await;
        let err = match out {
            Ok(t) => panic!(
                "expires_in {e}: a token expiring in {:?}",
                t.expires_at().map(|x| x - Instant::now())
            ),
            Err(err) => err,
        };
        let msg = err.to_string();
        assert!(msg.contains("expire"), "{e}: {msg}");
        assert!(!msg.contains("secret-21-xyz"), "{msg}");
        let _ = cc.get().await;
        let _ = cc.get().await;
        assert_eq!(calls.load(Ordering::SeqCst), 1, "{e}: refresh loop");
    }
}

/// Strings that Rust reads as infinite floats: either a clamped day or an error, never a panic.
#[tokio::test(start_paused = true)]
async fn words21_infinite_float_strings_never_panic() {
    for e in [
        "\"inf\"",
        "\"Infinity\"",
        "\"+inf\"",
        "\"1e999999\"",
        "\"  3600  \"",
    ] {
        let (out, _) = lifetime_of(e).await;
        if let Ok(life) = out {
            assert!(life <= DAY, "{e}: {life:?}");
        }
    }
}

/// Tiny positive lifetimes (under a second, or rounding to zero as a double) must not make
/// a refresh loop: the docs promise no refresh loop for lifetimes the source cannot use.
#[tokio::test(start_paused = true)]
async fn words21_tiny_expires_in_no_refresh_loop() {
    for e in ["1e-400", "\"1e-400\"", "0.000001"] {
        let calls = Arc::new(AtomicU32::new(0));
        let cc = endpoint(token_body(e), calls.clone());
        for _ in 0..5 {
            let _ = cc.get().await;
        }
        assert!(
            calls.load(Ordering::SeqCst) <= 2,
            "{e}: {} token requests for 5 calls at one instant",
            calls.load(Ordering::SeqCst)
        );
    }
}

/// A missing `expires_in` is 1 h.
#[tokio::test(start_paused = true)]
async fn words21_missing_expires_in_is_an_hour() {
    let calls = Arc::new(AtomicU32::new(0));
    let cc = endpoint(
        r#"{"access_token":"tok-21","token_type":"Bearer"}"#.to_owned(),
        calls,
    );
    let start = Instant::now();
    let life = cc.get().await.unwrap().expires_at().unwrap() - start;
    assert!(
        life <= HOUR && life >= HOUR - Duration::from_secs(1),
        "{life:?}"
    );
}

/// A clamped huge token is reused, not refetched, by many concurrent callers through an auth
/// layer under `Buffer` and `ConcurrencyLimit(1)`: one token request in all.
#[tokio::test(start_paused = true)]
async fn words21_clamped_token_shared_by_buffered_callers() {
    let calls = Arc::new(AtomicU32::new(0));
    let cc = endpoint(token_body("1e400"), calls.clone());
    let api_calls = Arc::new(AtomicU32::new(0));
    let a2 = api_calls.clone();
    let api = service_fn(move |req: Req| {
        a2.fetch_add(1, Ordering::SeqCst);
        let auth = req.headers().get("authorization").cloned();
        async move {
            assert_eq!(auth.unwrap(), "Bearer tok-21");
            Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
        }
    });
    let svc = ServiceBuilder::new()
        .buffer(16)
        .concurrency_limit(1)
        .layer(AuthLayer::oauth2(cc))
        .service(api);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let mut s = svc.clone();
        tasks.push(tokio::spawn(async move {
            let req = Request::get("http://api.example.com/x")
                .body(Full::default())
                .unwrap();
            s.ready().await?.call(req).await.map(|r| r.status())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), StatusCode::OK);
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(api_calls.load(Ordering::SeqCst), 20);
    // Twenty-three hours later the token is still used.
    tokio::time::sleep(Duration::from_secs(23 * 3600)).await;
    let mut s = svc.clone();
    let req = Request::get("http://api.example.com/x")
        .body(Full::default())
        .unwrap();
    s.ready().await.unwrap().call(req).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

/// A token endpoint whose client fails with an io error, shared by many waiting callers: each
/// caller's error chain holds the io error (`find` and a `source()` walk), the call was not
/// sent, and under the retry layer and a `Buffer` the io error is still found.
#[tokio::test(start_paused = true)]
async fn words21_shared_token_io_failure_in_every_callers_chain() {
    let token_calls = Arc::new(AtomicU32::new(0));
    let t2 = token_calls.clone();
    let token_client = service_fn(move |_req: Req| {
        t2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err::<Response<Full<Bytes>>, BoxError>(Box::new(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "token endpoint refused the connection",
            )))
        }
    });
    let cc = ClientCredentials::new(
        token_client,
        "https://auth.example.com/oauth/token?tenant=t1",
        "id-21",
        "secret-21-xyz",
    )
    .unwrap();
    let api_calls = Arc::new(AtomicU32::new(0));
    let a2 = api_calls.clone();
    let api = service_fn(move |_req: Req| {
        a2.fetch_add(1, Ordering::SeqCst);
        async move { Ok::<_, BoxError>(Response::new(Full::<Bytes>::default())) }
    });
    let svc = ServiceBuilder::new()
        .buffer(32)
        .layer(RetryLayer::new().with_max_attempts(1))
        .layer(AuthLayer::oauth2(cc))
        .service(api);
    let futs = (0..10).map(|_| {
        let mut s = svc.clone();
        async move {
            let req = Request::post("http://api.example.com/orders")
                .body(Full::from("{}"))
                .unwrap();
            match s.ready().await {
                Ok(s) => s.call(req).await,
                Err(e) => Err(e),
            }
        }
    });
    let outs = futures_util::future::join_all(futs).await;
    for out in outs {
        let err = out.unwrap_err();
        let io = find::<io::Error>(&*err).unwrap_or_else(|| panic!("no io error: {err:?}"));
        assert_eq!(io.kind(), io::ErrorKind::ConnectionRefused);
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&*err);
        let mut by_source = false;
        while let Some(c) = cur {
            by_source |= c.is::<io::Error>();
            cur = c.source();
        }
        assert!(by_source, "{err:?}");
        assert_eq!(delivery(&*err), Delivery::NotSent, "{err}");
        let msg = err.to_string();
        assert!(!msg.contains("tenant=t1"), "{msg}");
        assert!(!msg.contains("secret-21-xyz"), "{msg}");
        let e = find::<Error>(&*err).unwrap();
        assert!(e.is_retryable(), "{msg}");
    }
    assert_eq!(api_calls.load(Ordering::SeqCst), 0);
    assert_eq!(token_calls.load(Ordering::SeqCst), 1);
}

/// A real connection refused by a closed loopback port, through a hyper-util client: the
/// `get` error's chain holds the io error under hyper's, and the kind is `Connect`.
#[tokio::test]
async fn words21_real_connection_refused_token_endpoint_chain() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let http = HyperClient::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let cc = ClientCredentials::new(
        http,
        &format!("http://user:pw@{addr}/token?key=abc"),
        "id-21",
        "secret-21-xyz",
    )
    .unwrap()
    .with_request_timeout(Duration::from_secs(5));
    let err = cc.get().await.unwrap_err();
    let msg = err.to_string();
    assert!(!msg.contains("pw@") && !msg.contains("key=abc"), "{msg}");
    assert!(find::<io::Error>(&err).is_some(), "{err:?}");
    assert!(err.is_retryable(), "{msg}");
    assert_eq!(err.kind(), &ErrorKind::Connect, "{msg}");
    assert!(
        find::<hyper_util::client::legacy::Error>(&err).is_some(),
        "{err:?}"
    );
}

/// A caller that gives up on a slow token request (a tower `Timeout` above the auth layer)
/// does not cancel it for the others: the token still arrives once, and later callers use it.
#[tokio::test(start_paused = true)]
async fn words21_cancelled_token_waiter_does_not_cancel_request() {
    let token_calls = Arc::new(AtomicU32::new(0));
    let t2 = token_calls.clone();
    let token_client = service_fn(move |_req: Req| {
        t2.fetch_add(1, Ordering::SeqCst);
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            Ok::<_, BoxError>(Response::new(Full::new(Bytes::from(token_body("1e400")))))
        }
    });
    let cc = ClientCredentials::new(
        token_client,
        "https://auth.example.com/oauth/token",
        "id-21",
        "secret-21-xyz",
    )
    .unwrap();
    let api = service_fn(|_req: Req| async {
        Ok::<_, BoxError>(Response::new(Full::<Bytes>::default()))
    });
    let auth = AuthLayer::oauth2(cc.clone());
    let mut short = ServiceBuilder::new()
        .timeout(Duration::from_millis(100))
        .layer(auth.clone())
        .service(api);
    let req = Request::get("http://api.example.com/x")
        .body(Full::default())
        .unwrap();
    assert!(short.ready().await.unwrap().call(req).await.is_err());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let t = cc.get().await.unwrap();
    let life = t.expires_at().unwrap() - Instant::now();
    assert!(life > DAY - Duration::from_secs(10), "{life:?}");
    assert_eq!(token_calls.load(Ordering::SeqCst), 1);
}

/// `Duration::MAX` settings ("read as about 30 years; never a panic"): a maximum lifetime of
/// `Duration::MAX` with an absurd `expires_in`, a default lifetime of `Duration::MAX` with none,
/// a skew and a request timeout of `Duration::MAX`. Each gives a token (or an error), never a
/// panic, and the token is used by a second caller without another request.
#[tokio::test(start_paused = true)]
async fn words21_duration_max_lifetimes_never_panic() {
    let cases: Vec<(&str, Box<dyn Fn(ClientCredentials) -> ClientCredentials>)> = vec![
        ("1e400", Box::new(|c| c.with_max_lifetime(Duration::MAX))),
        ("1e19", Box::new(|c| c.with_max_lifetime(Duration::MAX))),
        (
            "18446744073709551615",
            Box::new(|c| c.with_max_lifetime(Duration::MAX)),
        ),
        ("3600", Box::new(|c| c.with_skew(Duration::MAX))),
        ("3600", Box::new(|c| c.with_request_timeout(Duration::MAX))),
    ];
    for (e, cfg) in cases {
        let calls = Arc::new(AtomicU32::new(0));
        let cc = cfg(endpoint(token_body(e), calls.clone()));
        let first = tokio::spawn({
            let cc = cc.clone();
            async move { cc.get().await.map(|t| t.expires_at()) }
        })
        .await
        .unwrap_or_else(|p| panic!("expires_in {e}: panicked: {p:?}"));
        if first.is_ok() {
            let _ = cc.get().await;
            assert_eq!(calls.load(Ordering::SeqCst), 1, "{e}");
        }
    }
    let calls = Arc::new(AtomicU32::new(0));
    let cc = endpoint(
        r#"{"access_token":"tok-21","token_type":"Bearer"}"#.to_owned(),
        calls.clone(),
    )
    .with_default_lifetime(Duration::MAX);
    let out = tokio::spawn({
        let cc = cc.clone();
        async move { cc.get().await.is_ok() }
    })
    .await
    .expect("a default lifetime of Duration::MAX panicked");
    assert!(out);
}
