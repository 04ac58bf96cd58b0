//! sturdy_reqwest today: an error of another reqwest-middleware below `SturdyMiddleware` reads
//! "may have been processed" and shows no URL query (nor user info) in `Display` or `Debug`;
//! `sturdy_reqwest::find` looks beside a cause (`Error::related`) as `sturdy_core::find` does.
#![cfg(feature = "full")]

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::Extensions;
use reqwest_middleware::{Middleware, Next};
use sturdy::circuit::CircuitBreakerLayer;
use sturdy::core::{CircuitOpen, Delivery};
use sturdy::reqwest::SturdyMiddleware;
use sturdy::retry::{Backoff, RetryLayer};
use sturdy::ClientBuilder;

#[derive(Debug)]
struct Text(String);
impl std::fmt::Display for Text {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Text {}

#[derive(Clone, Copy)]
enum Mode {
    /// Fails with a middleware error whose text holds a URL with user info and a query.
    TextWithUrl,
    /// Fails with reqwest's own error for a URL with a query, wrapped as a middleware error.
    WrappedReqwest,
    /// The same reqwest error, as the `Reqwest` variant.
    BareReqwest,
    /// Answers 503 without the network.
    Unavailable,
}

/// A middleware below sturdy's.
#[derive(Clone)]
struct Below {
    mode: Mode,
    calls: Arc<AtomicU32>,
}

type Fut<'a> =
    Pin<Box<dyn Future<Output = reqwest_middleware::Result<reqwest::Response>> + Send + 'a>>;

impl Middleware for Below {
    fn handle<'a, 'b, 'c, 'd>(
        &'a self,
        _req: reqwest::Request,
        _extensions: &'b mut Extensions,
        _next: Next<'c>,
    ) -> Fut<'d>
    where
        'a: 'd,
        'b: 'd,
        'c: 'd,
        Self: 'd,
    {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mode = self.mode;
        Box::pin(async move {
            let url = "http://127.0.0.1:1/v1/items?api_key=SECRETKEY42";
            match mode {
                Mode::TextWithUrl => Err(reqwest_middleware::Error::middleware(Text(
                    "gateway refused http://user:pw0rd@api.test:8080/v1/items?api_key=SECRETKEY42 after sending it"
                        .into(),
                ))),
                Mode::WrappedReqwest | Mode::BareReqwest => {
                    let e = reqwest::Client::new().get(url).send().await.unwrap_err();
                    if matches!(mode, Mode::BareReqwest) {
                        Err(reqwest_middleware::Error::Reqwest(e))
                    } else {
                        Err(reqwest_middleware::Error::middleware(e))
                    }
                }
                Mode::Unavailable => Ok(reqwest::Response::from(
                    http::Response::builder()
                        .status(503)
                        .body(Vec::<u8>::new())
                        .unwrap(),
                )),
            }
        })
    }
}

fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = format!("{e} || {e:?}");
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(" | {c} || {c:?}"));
        cur = c.source();
    }
    s
}

#[tokio::test]
async fn an_error_of_a_middleware_below_may_have_been_processed_and_hides_queries() {
    for mode in [Mode::TextWithUrl, Mode::WrappedReqwest] {
        let below = Below {
            mode,
            calls: Arc::default(),
        };
        let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(SturdyMiddleware::new(|next| next))
            .with(below.clone())
            .build();
        let err = client
            .post("http://api.test/v1/items?page=2")
            .body("x")
            .send()
            .await
            .expect_err("the middleware below fails");
        assert_eq!(below.calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            sturdy::reqwest::delivery(&err),
            Delivery::MaybeProcessed,
            "{err:?}"
        );
        let all = format!("{err} || {err:?} || {}", chain(&err));
        assert!(!all.contains("SECRETKEY42"), "query shown: {all}");
        assert!(!all.contains("pw0rd"), "user info shown: {all}");
        assert!(all.contains("/v1/items"), "path kept: {all}");
    }
}

/// The `Reqwest` variant from below (a refused connect): reqwest may have followed a redirect,
/// so it is "may have been processed" too, and its query is not shown either.
#[tokio::test]
async fn a_reqwest_error_from_below_hides_its_query() {
    let below = Below {
        mode: Mode::BareReqwest,
        calls: Arc::default(),
    };
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| next))
        .with(below.clone())
        .build();
    let err = client
        .get("http://api.test/v1/items")
        .send()
        .await
        .expect_err("fails");
    let all = format!("{err} || {err:?} || {}", chain(&err));
    assert!(!all.contains("SECRETKEY42"), "query shown: {all}");
    assert_eq!(sturdy::reqwest::delivery(&err), Delivery::MaybeProcessed);
}

/// An open breaker's refusal after a sent 503: `find::<CircuitOpen>` finds it, as
/// `sturdy_core::find` does on the same error.
#[tokio::test]
async fn find_circuit_open_beside_a_sent_attempts_cause() {
    let below = Below {
        mode: Mode::Unavailable,
        calls: Arc::default(),
    };
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| {
            ClientBuilder::new()
                .with_retry(
                    RetryLayer::new().with_max_attempts(3).with_backoff(
                        Backoff::exponential(Duration::from_millis(1), Duration::from_millis(2))
                            .unwrap(),
                    ),
                )
                .with_circuit_breaker(CircuitBreakerLayer::new().with_consecutive_failures(1))
                .without_rate_limit()
                .without_adaptive_concurrency()
                .without_hedge()
                .build(next)
        }))
        .with(below.clone())
        .build();
    let err = client
        .get("http://api.test/v1/items")
        .send()
        .await
        .expect_err("503 then an open breaker");
    assert_eq!(below.calls.load(Ordering::SeqCst), 1, "{err:?}");
    let core_inner: &(dyn std::error::Error + 'static) = match &err {
        reqwest_middleware::Error::Middleware(e) => e.as_ref(),
        reqwest_middleware::Error::Reqwest(e) => e,
    };
    let by_core = sturdy::core::find::<CircuitOpen>(core_inner).is_some();
    let by_reqwest = sturdy::reqwest::find::<CircuitOpen>(&err).is_some();
    assert!(
        by_core,
        "sturdy_core::find sees no CircuitOpen: {}",
        chain(core_inner)
    );
    assert!(
        by_reqwest,
        "sturdy_reqwest::find sees no CircuitOpen: {err:?}"
    );
    assert!(sturdy::reqwest::find::<sturdy::core::Error>(&err).is_some());
}

/// `find`'s rustdoc names `find::<reqwest::Error>(&err)`; a reqwest error that a middleware below
/// sturdy's returned (the `Reqwest` variant, or wrapped) is "kept as its text" (CHANGELOG).
/// Whether `find` still reaches it.
#[tokio::test]
async fn find_reqwest_error_from_below() {
    for mode in [Mode::BareReqwest, Mode::WrappedReqwest] {
        let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
            .with(SturdyMiddleware::new(|next| next))
            .with(Below {
                mode,
                calls: Arc::default(),
            })
            .build();
        let err = client
            .get("http://api.test/v1/items")
            .send()
            .await
            .expect_err("fails");
        assert!(
            sturdy::reqwest::find::<reqwest::Error>(&err).is_some(),
            "{err:?}"
        );
    }
}

/// reqwest CHANGELOG: an error of another middleware below has delivery `MaybeProcessed`
/// ("the text is the middleware's own").
#[tokio::test]
async fn an_error_of_a_middleware_below_may_have_been_processed() {
    let client = reqwest_middleware::ClientBuilder::new(reqwest::Client::new())
        .with(SturdyMiddleware::new(|next| next))
        .with(Below {
            mode: Mode::TextWithUrl,
            calls: Arc::default(),
        })
        .build();
    let err = client
        .post("http://api.test/v1/items")
        .body("x")
        .send()
        .await
        .expect_err("fails");
    let all = format!("{err} || {err:?} || {}", chain(&err));
    assert_eq!(
        sturdy::reqwest::delivery(&err),
        sturdy::core::Delivery::MaybeProcessed,
        "{all}"
    );
    assert!(!all.contains("not sent"), "{all}");
}
